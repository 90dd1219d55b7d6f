"""Models on disk: the file format (:mod:`.format`: safetensors weights, ``config.json``, the
tokenizer beside them), LoRA adapters (:mod:`.adapters`: peft's injection, loading and merging),
RecurrentGemma's formats (:mod:`.convert`: the DeepMind and HF checkpoints in, HF out) and one
opener for every path a user may give (:mod:`.source`)."""

from griffon.checkpoint.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_matches,
    check_state_dict,
    check_state_dict_shapes,
    inference_device,
    is_adapter,
    load_config,
    read_safetensors,
    resolve,
    save_pretrained,
    save_state_dict,
    tensor_shapes,
    tokenizer_dirs,
    write_model,
)
from griffon.checkpoint.source import (
    ModelSource,
    check_fingerprint,
    checkpoint_weights,
    fingerprint,
    from_pretrained,
    load_for_inference,
    open_source,
    open_source_with_tokenizer,
)

__all__ = [
    "ADAPTER_CONFIG_NAME", "ADAPTER_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "CheckpointError", "ModelSource",
    "check_fingerprint", "check_matches", "check_state_dict", "check_state_dict_shapes", "checkpoint_weights",
    "fingerprint", "from_pretrained", "inference_device", "is_adapter", "load_config", "load_for_inference",
    "open_source", "open_source_with_tokenizer", "read_safetensors", "resolve",
    "save_pretrained", "save_state_dict", "tensor_shapes", "tokenizer_dirs", "write_model",
]  # fmt: skip
