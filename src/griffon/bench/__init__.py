"""The benchmarks, one module each, run as ``griffon bench NAME``; each prints its figures and
writes them as JSON with ``--json``. Run them on an otherwise idle machine: ratios measured in
one run compare, absolute figures drift.

* ``sample``: decode tokens/s, latency and state vs batch and length; HF ``generate`` (:mod:`.sampling`)
* ``train``: training throughput against the HF and DeepMind references (:mod:`.train`)
* ``default-run``: throughput and MFU of the default ``griffon train`` model, fp32 and bf16 (:mod:`.default_run`)
* ``ffn``: structured FFN training and decode speed against dense (:mod:`.ffn`)
* ``moe``: the mixture-of-experts dispatch against its masked reference and an equal-FLOPs dense FFN (:mod:`.moe`)
* ``scan``: the linear scan against its memory bound (:mod:`.scan`)
* ``eval``: lm-evaluation-harness requests/s against lm-eval's own ``hf`` model (:mod:`.evaluation`)
* ``serve``: load on ``griffon serve`` over loopback; server vs offline, Griffin vs MQA, prefix cache (:mod:`.serve`)
* ``finetune``: LoRA against full fine-tuning, peak memory and tokens/s (:mod:`.finetune`)
* ``gpu``: Triton scans against their memory bound and public GPU scans, bf16 training and sampling
  throughput of Griffin, Hawk and the MQA transformer (:mod:`.gpu`; needs a CUDA GPU)
"""

BENCHMARKS = {
    "sample": "sampling",
    "train": "train",
    "default-run": "default_run",
    "ffn": "ffn",
    "moe": "moe",
    "scan": "scan",
    "eval": "evaluation",
    "gpu": "gpu",
    "serve": "serve",
    "finetune": "finetune",
}
