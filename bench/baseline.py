"""The baselines: transformers' own `generate`, on TensorFlow (eager) or on PyTorch (CPU).

One worker for both frameworks, so the two sides run the same code path and differ only in
the tensors they are handed. It runs in its own process, started by `bench.cli`:

    python -m bench.baseline JOB.json OUT.json

TensorFlow runs in the service's venv (`.venv`); PyTorch runs in `bench/.venv-torch`, where
TensorFlow is absent. For GPT-2, that venv cannot read `tf_model.h5`, so the TensorFlow worker
first converts the weights (`"convert_to"` in the job) to a `model.safetensors` that
`GPT2LMHeadModel.from_pretrained` loads, with the logits of a reference prompt beside it; the
PyTorch worker loads that file and checks its own logits against the reference before it
times anything. A Llama-family model directory holds `model.safetensors` itself (bfloat16, as
on the hub): the PyTorch worker loads it with `AutoModelForCausalLM` in float32, as a user on a
CPU would, and checks its logits against those bench/make_model.py recorded for the model it
saved (`bench-reference/`), which proves the loading (every weight read, biases and tied
embeddings included); there is no TensorFlow model of it and no TensorFlow worker.

Job (JSON): {"framework": "tf"|"pt", "model_dir": str, "weights_dir": str (pt, GPT-2 only: the
converted weights; without it the model directory's own are loaded), "reference_dir": str (pt:
the reference logits; default weights_dir), "convert_to": str (tf only, optional),
"retries_when_shared": int (optional), "runs": [{"name", "prompts", "batch_size",
"max_new_tokens"}]}. A run during which other processes used more than SHARED_CORES cores is
measured again, up to `retries_when_shared` times; the least shared attempt is kept and
`attempts` says how many there were. Result (JSON): {"framework", "versions", "threads",
"logits_check", "peak_rss_mib", "runs": [{"name", "batch_size", "requests", "new_tokens",
"seconds", "tok_per_s", "req_per_s", "latencies", "eos_stops", "prompt_tokens", "texts",
"cpu"}]}.

Greedy only (do_sample=False, and no repetition penalty: Qwen2.5's generation_config.json asks
for 1.1, which `generate` would apply, and the service applies only what a request asks for).
Generation stops at the model's end-of-sequence ids (generation_config.json's, as the
service's); each row's new tokens are counted up to and including its first one, so the counts
are the tokens the model really produced, and `eos_stops` says how often that happened.

Only the standard library (and bench.cpu, which uses nothing else) is imported at module
level: the PyTorch venv has no TensorFlow and the TensorFlow venv has no torch.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from bench.cpu import SHARED_CORES, CpuWindow, own_cpu_seconds

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Nothing is fetched from a hub here; a missing file must fail, not hang on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REFERENCE_PROMPT = "def main(argv=None):\n    parser = argparse.ArgumentParser("
WEIGHTS_FILE = "model.safetensors"
REFERENCE_FILE = "reference_logits.npy"
REFERENCE_IDS_FILE = "reference_ids.json"
# Where bench/make_model.py puts the reference files in a model directory it writes.
REFERENCE_DIR = "bench-reference"
# fp32 on both sides; the two frameworks order their sums differently, nothing more.
LOGITS_ATOL = 1e-3


def convert_tf_to_pt(model, tokenizer, model_dir: Path, out_dir: Path) -> dict:
    """Write `model`'s weights under PyTorch GPT-2 names, plus reference logits, to `out_dir`.

    GPT-2 keeps its projections in a `Conv1D` with the same (in, out) layout in both
    frameworks, so no matrix is transposed; only the TF biases carry an extra leading axis.
    """
    import numpy as np
    import tensorflow as tf
    from safetensors.numpy import save_file
    from transformers.modeling_tf_pytorch_utils import TransposeType, convert_tf_weight_name_to_pt_weight_name

    tensors = {}
    for weight in model.weights:
        name, transpose = convert_tf_weight_name_to_pt_weight_name(weight.name, tf_weight_shape=weight.shape)
        if transpose is not TransposeType.NO:
            raise SystemExit(f"unexpected transpose {transpose} for {weight.name}")
        value = weight.numpy().astype(np.float32)
        if name.endswith(".bias") and value.ndim == 2 and value.shape[0] == 1:
            value = value.reshape(-1)
        tensors[name] = np.ascontiguousarray(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            (out_dir / name).write_bytes((model_dir / name).read_bytes())
    ids = tokenizer(REFERENCE_PROMPT)["input_ids"]
    logits = model(tf.constant([ids])).logits.numpy()[0]
    np.save(out_dir / REFERENCE_FILE, logits)
    (out_dir / REFERENCE_IDS_FILE).write_text(json.dumps(ids))
    tmp.replace(out_dir / WEIGHTS_FILE)  # last, so a half-written conversion is never reused
    return {"tensors": len(tensors)}


def check_pt_logits(model, reference_dir: Path, reference: str) -> dict:
    """The loaded model's logits on the reference prompt against `reference_dir`'s (`reference`
    says whose they are: TensorFlow's, or the model's as bench/make_model.py saved it)."""
    import numpy as np
    import torch

    if not (reference_dir / REFERENCE_FILE).is_file():
        # A model directory given with --model-dir that bench/make_model.py did not write.
        return {"reference": None, "skipped": f"no {REFERENCE_FILE} in {reference_dir}"}
    ids = json.loads((reference_dir / REFERENCE_IDS_FILE).read_text())
    expected = np.load(reference_dir / REFERENCE_FILE)
    with torch.inference_mode():
        got = model(torch.tensor([ids])).logits[0].float().numpy()
    if got.shape != expected.shape:
        raise SystemExit(f"PyTorch logits have shape {got.shape}, the reference's ({reference}) {expected.shape}")
    diff = float(np.abs(got - expected).max())
    same_argmax = bool((got.argmax(-1) == expected.argmax(-1)).all())
    if diff > LOGITS_ATOL:
        raise SystemExit(f"PyTorch logits differ from the reference's ({reference}): max |diff| {diff:.3g} > {LOGITS_ATOL}")
    return {"reference": reference, "max_abs_diff": diff, "same_argmax": same_argmax, "positions": len(ids),
            "atol": LOGITS_ATOL}


class Generator:
    """transformers' `generate` for one framework, greedy, on lists of prompts."""

    def __init__(self, framework: str, model_dir: Path, weights_dir: Path | None):
        from transformers import AutoTokenizer

        self.framework = framework
        # Batched generation pads on the left (GPT-2's test tokenizer says so; the Llama-family
        # tokenizers, like their hub originals, leave it to the caller).
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            # GPT-2 has no pad token; padding is masked out, so end-of-text serves, as is usual.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if framework == "tf":
            from transformers import TFGPT2LMHeadModel

            self.model = TFGPT2LMHeadModel.from_pretrained(model_dir)
        elif weights_dir is not None:
            from transformers import GPT2LMHeadModel

            self.model, info = GPT2LMHeadModel.from_pretrained(weights_dir, output_loading_info=True)
            # lm_head is tied to wte; the causal-mask buffers are not weights.
            missing = [k for k in info["missing_keys"] if not k.startswith("lm_head") and not k.endswith(".attn.bias")]
            if missing or info["unexpected_keys"] or info["mismatched_keys"]:
                raise SystemExit(f"converted weights do not fit GPT2LMHeadModel: {info}")
            self.model.eval()
        else:
            import torch
            from transformers import AutoModelForCausalLM

            # float32 whatever the file holds (bfloat16 on the hub): what a CPU user runs.
            self.model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                    output_loading_info=True)
            if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
                raise SystemExit(f"{model_dir}'s weights do not fit {type(self.model).__name__}: {info}")
            self.model.eval()
        # What `generate` stops on: generation_config.json's end-of-sequence id or ids.
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos}

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], int]:
        """New token ids per prompt (up to and including the first end-of-sequence id) and the
        padded prompt length."""
        tensors = "tf" if self.framework == "tf" else "pt"
        enc = self.tokenizer(prompts, return_tensors=tensors, padding=True)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                      pad_token_id=self.tokenizer.pad_token_id)
        if self.framework == "tf":
            out = self.model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs).numpy()
        else:
            import torch

            with torch.inference_mode():
                out = self.model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs).numpy()
        width = enc["input_ids"].shape[1]
        rows = []
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            rows.append(row if stop is None else row[: stop + 1])
        return rows, width

    def run(self, spec: dict) -> dict:
        prompts, batch, max_new = spec["prompts"], spec["batch_size"], spec["max_new_tokens"]
        # One untimed call first: the first generate pays for graph tracing and allocation.
        self.generate(prompts[:batch], 2)
        latencies, new_tokens, eos_stops, texts = [], 0, 0, {}
        window = CpuWindow(own_cpu_seconds).start()
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            t0 = time.perf_counter()
            rows, _ = self.generate(chunk, max_new)
            latencies += [time.perf_counter() - t0] * len(chunk)
            for prompt, row in zip(chunk, rows):
                new_tokens += len(row)
                eos_stops += bool(row) and row[-1] in self.eos_ids
                texts.setdefault(prompt, self.tokenizer.decode(row, skip_special_tokens=True))
        seconds = time.perf_counter() - start
        cpu = window.stop()
        prompt_tokens = [len(self.tokenizer(p)["input_ids"]) for p in dict.fromkeys(prompts)]
        return {
            "name": spec["name"],
            "batch_size": batch,
            "max_new_tokens": max_new,
            "requests": len(prompts),
            "new_tokens": new_tokens,
            "seconds": seconds,
            "tok_per_s": new_tokens / seconds,
            "req_per_s": len(prompts) / seconds,
            "latencies": latencies,
            "eos_stops": eos_stops,
            "prompt_tokens": prompt_tokens,
            "texts": texts,
            "cpu": cpu,
        }


def _others(run: dict) -> float:
    return (run.get("cpu") or {}).get("other_cores") or 0.0


def versions(framework: str) -> tuple[dict, int | None]:
    import transformers

    if framework == "tf":
        import tensorflow as tf

        return {"tensorflow": tf.__version__, "transformers": transformers.__version__}, None
    import torch

    return {"torch": torch.__version__, "transformers": transformers.__version__}, torch.get_num_threads()


def main(argv: list[str]) -> int:
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    framework = job["framework"]
    model_dir = Path(job["model_dir"])
    weights_dir = Path(job["weights_dir"]) if job.get("weights_dir") else None
    gen = Generator(framework, model_dir, weights_dir)
    result: dict = {"framework": framework}
    result["versions"], result["threads"] = versions(framework)
    if framework == "tf" and job.get("convert_to"):
        result["conversion"] = convert_tf_to_pt(gen.model, gen.tokenizer, model_dir, Path(job["convert_to"]))
    if framework == "pt":
        reference_dir = Path(job.get("reference_dir") or weights_dir)
        reference = "TensorFlow's" if weights_dir is not None else "the model's as saved"
        result["logits_check"] = check_pt_logits(gen.model, reference_dir, reference)
    result["runs"] = []
    retries = int(job.get("retries_when_shared", 0))
    for spec in job["runs"]:
        run = gen.run(spec)
        attempts = 1
        while _others(run) > SHARED_CORES and attempts <= retries:
            print(f"[{framework}] {spec['name']}: other processes used {_others(run):.2f} cores; again", flush=True)
            again = gen.run(spec)
            attempts += 1
            run = min(run, again, key=_others)
        run["attempts"] = attempts
        print(
            f"[{framework}] {run['name']}: {run['new_tokens']} tokens in {run['seconds']:.1f} s "
            f"= {run['tok_per_s']:.1f} tok/s",
            flush=True,
        )
        result["runs"].append(run)
    # The worker's peak: the model, generate's caches at the largest batch, and the runtime.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
