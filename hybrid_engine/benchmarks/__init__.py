"""The pieces of the benchmarks that are code to test, not scripts to run: one module per job.

- hf_ppo: the HF baseline PPO of bench_rlhf.py's ppo cases (HF generate and eager PyTorch);
- ds_generate: DeepSpeed without a hybrid engine, the baseline of bench_rlhf.py's ZeRO-3 cases;
- rlhf_roofline: the work (FLOPs and bytes) of one RLHF step, phase by phase, and its fraction of the roofline;
- step_clock: the wall clock around every provider's step, measured apart from its phase timers.

The suites and the worker scripts that run them stay in bench/ (pytest bench/ --benchmark-only); tests/ imports these
modules and runs bench/'s workers only as scripts. This package imports the library; the library never imports it.
"""
