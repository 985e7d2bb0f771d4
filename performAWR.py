"""performAWR.py: the earlier name of performAIM.py (same flags, same behaviour)."""
from performAIM import main

if __name__ == "__main__":
    raise SystemExit(main())
