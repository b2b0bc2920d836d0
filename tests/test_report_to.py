"""--report-to (commands/trackers.py): a tiny real PPO run reports to wandb in offline mode and to mlflow's local file
store, each holding the numbers metrics.jsonl holds, at the same steps, and the step's config; `none` writes no
tensorboard/ but metrics.jsonl still; a crash ends the tracker runs as failed and keeps what was written; a bad name, a
missing package and the TRL YAML key report_to are handled in one line before any work."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from demo_models import save_demo_llama

from hybrid_engine.commands import common, run_keys, trackers
from hybrid_engine.commands.main import build_parser, main
from hybrid_engine.commands.metrics import MetricsLog, read_metrics
from hybrid_engine.rlhf.demo import DEMO_DIR
from hybrid_engine.rlhf.ppo import PPOConfig

TINY_GRPO = ["--algo", "grpo", "--num-generations", "2", "--no-reward-model", "--reward-fn",
             "hybrid_engine.rlhf.demo:rule_score_batch", "--eval-fn", "hybrid_engine.rlhf.demo:rule_score_batch",
             "--eval-fraction", "0.2", "--max-steps", "2", "--batch-size", "4", "--train-batch-size", "4",
             "--max-new-tokens", "8", "--no-progress"]


def quiet_trackers(mp: pytest.MonkeyPatch, home: Path) -> None:
    """wandb offline and silent, its config and caches under `home`; mlflow with no tracking URI (our default store)."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_CONFIG_DIR": home / "cfg",
                        "WANDB_CACHE_DIR": home / "cache", "WANDB_DATA_DIR": home / "data"}.items():
        mp.setenv(name, str(value))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        mp.delenv(name, raising=False)
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so that the value trackers.py sets is undone after
    mp.delenv("MLFLOW_ALLOW_FILE_STORE")


def end_tracker_services() -> None:
    """Stops wandb's service process and forgets accelerate's PartialState, so that nothing outlives the tests."""
    import wandb
    from accelerate.state import PartialState

    wandb.teardown()
    PartialState._reset_state()  # accelerate's own reset: a later test's Accelerator() starts afresh


def first_rows(folder: Path, step: str, rows: int) -> Path:
    """The demo's first rows of `step` as the user's own file (converting the whole file takes longer than a tiny
    run)."""
    path = folder / f"{step}.jsonl"
    path.write_text("\n".join((DEMO_DIR / f"{step}.jsonl").read_text().splitlines()[:rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, cache):
    """A tiny GRPO run reporting to wandb and mlflow: its output folder."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("report")
    model = save_demo_llama(root / "model")
    data = first_rows(root, "ppo", 40)
    with pytest.MonkeyPatch.context() as mp:
        quiet_trackers(mp, root / "home")
        try:
            assert main(["ppo", "--model", str(model), "--data", str(data), *TINY_GRPO, "--cache-dir", cache,
                         "--output", str(root / "run"), "--report-to", "wandb,mlflow", "--run-name", "tiny"]) == 0
        finally:
            end_tracker_services()
    return root / "run"


def numbers(records: list[dict]) -> dict[tuple[int, str], float]:
    """{(step, 'ppo/key'): value} of every finite number metrics.jsonl's records hold (what the trackers get)."""
    return {(r["step"], f"{r['tag']}/{k}"): v for r in records for k, v in r.items()
            if k not in ("step", "tag") and trackers.is_number(v)}


# -- wandb ---------------------------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a wandb transaction log (run-ID.wandb): a 7-byte W&B header, then LevelDB's log format
    (32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, block, payload = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


@pytest.mark.slow
def test_a_wandb_offline_run_holds_every_number_of_metrics_jsonl(ppo_run):
    runs = list((ppo_run / "wandb").glob("offline-run-*/run-*.wandb"))  # under --output: no WANDB_DIR was set
    assert len(runs) == 1
    logged, config, tables, name = {}, {}, set(), None
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name, project = record.run.display_name, record.run.project
        elif kind == "config":
            config.update({item_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            values = {item_key(i): json.loads(i.value_json) for i in record.history.item}
            for key, value in values.items():
                if key.startswith("ppo/samples."):  # the table's fields: its file, rows, columns
                    tables.add(values["_step"])
                elif not key.startswith("_"):
                    logged[(values["_step"], key)] = value
    expected = numbers(read_metrics(ppo_run / "metrics.jsonl"))
    assert logged == pytest.approx(expected) and (2, "ppo/policy_loss") in logged and (0, "ppo/rule") in logged
    assert (name, project) == ("tiny", trackers.PROJECT)
    assert config["lr"] == PPOConfig().lr and config["algo"] == "grpo" and config["max_new_tokens"] == 8
    assert tables == {1, 2}  # each step's samples, as a table


# -- mlflow --------------------------------------------------------------------------------------------------------


def mlflow_runs(store: Path) -> list[Path]:
    return [meta.parent for meta in store.glob("*/*/meta.yaml")]


def mlflow_metrics(run: Path) -> dict[tuple[int, str], float]:
    """{(step, key): value} of a file-store run: metrics/KEY holds 'timestamp value step' lines."""
    out = {}
    for path in (run / "metrics").rglob("*"):
        if path.is_file():
            for line in path.read_text().splitlines():
                _, value, step = line.split()
                out[(int(step), path.relative_to(run / "metrics").as_posix())] = float(value)
    return out


@pytest.mark.slow
def test_an_mlflow_file_store_in_the_output_holds_every_number_of_metrics_jsonl(ppo_run):
    runs = mlflow_runs(ppo_run / "mlruns")
    assert len(runs) == 1 and not Path("mlflow.db").exists() and not Path("mlruns").exists()
    run = runs[0]
    assert mlflow_metrics(run) == pytest.approx(numbers(read_metrics(ppo_run / "metrics.jsonl")))
    assert (run / "tags" / "mlflow.runName").read_text() == "tiny"
    assert "status: 3" in (run / "meta.yaml").read_text()  # RunStatus.FINISHED
    assert float((run / "params" / "lr").read_text()) == PPOConfig().lr
    assert (run / "params" / "tokens.max_prompt_len").read_text() == str(PPOConfig().tokens.max_prompt_len)


@pytest.mark.slow
def test_the_plot_and_tensorboard_follow_report_to(ppo_run):
    assert (ppo_run / "ppo.png").is_file() and not (ppo_run / "tensorboard").exists()  # not named: not written


def test_a_crash_keeps_what_was_written_and_ends_the_tracker_runs_as_failed(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    report = trackers.Reporting(to=("wandb", "mlflow"), run_name="crash", root=str(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        quiet_trackers(mp, tmp_path / "home")
        mp.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))  # wandb's own setting wins over the output folder
        (tmp_path / "wandb-dir").mkdir()
        try:
            with pytest.raises(RuntimeError, match="killed"), MetricsLog(tmp_path / "ppo", "ppo", report=report) as log:
                log.write(1, {"score": 0.5, "kl": 0.25})
                raise RuntimeError("killed")
            assert "MLFLOW_TRACKING_URI" not in os.environ  # not left behind: the next run picks its own store
        finally:
            end_tracker_services()
    assert read_metrics(tmp_path / "ppo" / "metrics.jsonl") == [{"tag": "ppo", "step": 1, "score": 0.5, "kl": 0.25}]
    (run,) = mlflow_runs(tmp_path / "mlruns")
    assert mlflow_metrics(run) == {(1, "ppo/score"): 0.5, (1, "ppo/kl"): 0.25}
    assert "status: 4" in (run / "meta.yaml").read_text()  # RunStatus.FAILED
    assert not (tmp_path / "wandb").exists()
    (log_file,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(log_file))
    history = [{item_key(i): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    assert [(h["_step"], h["ppo/score"], h["ppo/kl"]) for h in history] == [(1, 0.5, 0.25)]
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [1]


# -- none, and what is refused -------------------------------------------------------------------------------------


def test_none_writes_metrics_jsonl_and_no_tensorboard(tmp_path, cache):
    model, rows = save_demo_llama(tmp_path / "model"), first_rows(tmp_path, "sft", 24)
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(model), "--data", str(rows), "--max-steps", "2", "--batch-size", "4",
                 "--no-progress", "--cache-dir", cache, "--output", str(out), "--report-to", "none"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["step"], r["loss"], r["lr"]) for r in records] == list(zip([1, 2], summary["losses"], summary["lrs"]))
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists() and not (out / "mlruns").exists()


@pytest.mark.parametrize("given, message", [
    (["wandbx"], "--report-to wandbx: 'wandbx' is not a tracker; accepted: tensorboard, wandb, mlflow, trackio, all "),
    (["wandb,none"], "--report-to wandb,none: 'none' reports to no tracker; it cannot stand beside another name"),
    ([","], "--report-to ,: no tracker named; accepted: tensorboard"),
])
def test_a_bad_name_is_refused_in_one_line_before_any_work(tmp_path, given, message):
    out = tmp_path / "sft"
    with pytest.raises(ValueError) as e:
        main(["sft", "--demo", "--output", str(out), "--report-to", *given])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not out.exists()


def test_a_tracker_whose_package_is_missing_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.AVAILABLE, "wandb", lambda: False)
    out = tmp_path / "ppo"
    with pytest.raises(ValueError) as e:
        main(["ppo", "--model", str(tmp_path), "--demo", "--output", str(out), "--report-to", "tensorboard", "wandb"])
    assert str(e.value) == "--report-to wandb: the wandb package is not installed (pip install wandb)"
    assert not out.exists()
    monkeypatch.setitem(trackers.AVAILABLE, "mlflow", lambda: False)
    assert trackers.parse_names(["all"]) == tuple(n for n in trackers.NAMES if n not in ("wandb", "mlflow")
                                                  and trackers.installed(n))


@pytest.mark.parametrize("given, expected", [
    (None, ("tensorboard",)), (["none"], ()), (["wandb", "tensorboard"], ("tensorboard", "wandb")),
    (["mlflow,wandb", "wandb"], ("wandb", "mlflow")), (["TensorBoard"], ("tensorboard",))])
def test_names_are_read_as_trl_reads_them(monkeypatch, given, expected):
    for name in trackers.NAMES:
        monkeypatch.setitem(trackers.AVAILABLE, name, lambda: True)
    assert trackers.parse_names(given) == expected
    assert trackers.parse_names(["all"]) == trackers.NAMES


def ppo_args(tmp_path: Path, values: dict, *argv: str):
    path = tmp_path / "grpo.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    args = build_parser().parse_args(["ppo", "--config", str(path), *argv])
    config = common.step_config(args, PPOConfig, "ppo", run_keys.PPO)
    return args, trackers.reporting(args, config.output_dir)


@pytest.mark.parametrize("value, expected", [
    ("wandb", ("wandb",)), (["wandb", "tensorboard"], ("tensorboard", "wandb")), ("none", ()), ([], ())])
def test_trls_report_to_and_run_name_load_from_a_yaml(tmp_path, monkeypatch, value, expected):
    for name in trackers.NAMES:
        monkeypatch.setitem(trackers.AVAILABLE, name, lambda: True)
    _, report = ppo_args(tmp_path, {"report_to": value, "run_name": "exp1", "output_dir": "out/grpo",
                                    "num_generations": 4, "ppo": {"algo": "grpo"}})
    assert report == trackers.Reporting(to=expected, run_name="exp1", root="out/grpo")
    assert report.for_step("sft").run_name == "exp1-sft"


def test_the_flag_wins_over_the_file_and_the_run_is_named_after_its_output(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.AVAILABLE, "mlflow", lambda: True)
    args, report = ppo_args(tmp_path, {"report_to": "wandbx"}, "--report_to", "mlflow", "--output", "out/run7")
    assert args.report_to == ["mlflow"] and report == trackers.Reporting(("mlflow",), "run7", "out/run7")
    args = build_parser().parse_args(["train", "--report-to", "wandb", "--report_to", "mlflow,tensorboard"])
    assert args.report_to == ["wandb", "mlflow,tensorboard"]  # a flag given twice adds to the list
    with pytest.raises(ValueError, match="'report_to' must be a tracker name or a list of them, got 3"):
        ppo_args(tmp_path, {"report_to": 3})
