"""What a merged folder says about itself: the resolved recipe file and a short model card."""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from checkpoints.errors import writing

RECIPE_FILE = "merge_recipe.yaml"
TOOLKIT_VERSION = "0.1.0"


def package_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (read from metadata, no imports)."""
    versions = {"toolkit": TOOLKIT_VERSION, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "accelerate", "lm_eval"):
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_record(folder: Path, record: dict) -> Path:
    """Write the resolved recipe (+ versions and time) as YAML next to the weights."""
    full = {**record, "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = Path(folder) / RECIPE_FILE
    with writing(path):
        path.write_text(yaml.safe_dump(full, sort_keys=False))
    return path


def read_record(folder: Path) -> dict:
    path = Path(folder) / RECIPE_FILE
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def write_model_card(folder: Path, record: dict) -> Path:
    """A short README.md naming the method, inputs and parameters."""
    merge = record.get("merge", {})
    lines = ["---", "tags: [merge, aim]" if "aim" in record else "tags: [merge]", "---", "",
             "# Merged model", ""]
    if merge:
        lines += [f"Method: `{merge['method']}` on base `{merge['base_model']}`.", "",
                  "Models merged:", *[f"- `{m}`" for m in merge["models"]], "",
                  "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in merge["params"].items()), ""]
    if "aim" in record:
        aim = record["aim"]
        lines += [f"Activation-Informed Merging applied with omega = {aim.get('omega')} "
                  f"(mode `{aim.get('mode', 'aim')}`), base `{aim.get('base_model')}`.", ""]
    lines += [f"The full resolved recipe is in `{RECIPE_FILE}`.", ""]
    path = Path(folder) / "README.md"
    with writing(path):
        path.write_text("\n".join(lines))
    return path
