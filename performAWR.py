"""performAWR.py: the earlier name of performAIM.py (same flags, same behaviour)."""
from checkpoints.errors import exit_process
from performAIM import main

if __name__ == "__main__":
    exit_process(main())
