"""msmodelslim-style checkpoint directories: read lazily, write atomically.

Layout (what msmodelslim emits and vllm-ascend / MindIE load)::

    out/
      quant_model_description.json   {"model_quant_type": "W8A8", "version": "1.0.0",
                                      "group_size": 0, "<tensor name>": "<quant type>", ...}
      model.safetensors              (one shard), or
      model-00001-of-0000N.safetensors ... + model.safetensors.index.json ({"metadata":
                                      {"total_size": ...}, "weight_map": {name: file}})
      config.json, tokenizer files   (copied from the source model by the converter)

Every tensor of the model has an entry in the description: ``"FLOAT"`` for tensors kept in
float (embeddings, norms, lm_head, ...), the layer's quant type for every tensor of a quantized
layer (``weight``, ``weight_scale``, ``deq_scale``, ...).

Evidence for the conventions (msmodelslim's "quantized weight format" doc and vllm-ascend's
``quantization/methods/w8a8_static.py``, ``w8a16.py``, ``w8a8_dynamic.py``,
``modelslim_config.py``):

- W8A8: ``weight`` int8 [n, k]; ``input_scale`` [1] in the model dtype; ``input_offset`` [1]
  (msmodelslim doc: same dtype as input_scale; vllm-ascend declares int8 and casts - we write the
  model dtype and accept int8); ``deq_scale`` [n] int64 for fp16 models, float32 for bf16 models
  (vllm-ascend ``get_perchannel_param``); ``quant_bias`` int32 [n]; vllm-ascend also creates
  ``weight_scale`` / ``weight_offset`` [n, 1] in the model dtype (newer msmodelslim emits them;
  we write them and treat them as optional). No float ``bias``: it is folded in quant_bias.
  vllm-ascend's ``scale_from_float_to_int64`` stores float32 bits in int64 via numpy
  int32 -> int64 (sign extension; identical to zero extension for the positive scales here).
- W8A16: ``weight``, ``weight_scale``, ``weight_offset``; msmodelslim doc: float32, per-channel
  [n], per-group [n, k / group_size]; vllm-ascend creates [n, 1] in the model dtype and
  passes ``weight_offset`` unchanged to npu_weight_quant_batchmatmul (fine only because its
  offsets are zero); the msmodelslim doc says the NPU op computes ``(w + offset) * scale`` and
  the framework negates the offset at load (our ``quant.convention.to_antiquant_offset``).
- W8A8_DYNAMIC: ``weight``, ``weight_scale`` / ``weight_offset`` [n, 1] model dtype.
- The description's global ``group_size`` is read by vllm-ascend's grouped schemes.

Modules, one job each: ``format`` (file names, dtypes, errors), ``safetensors_file`` (one
safetensors file read through one descriptor: header checks, ``StoredTensor`` range reads,
change detection), ``directory`` (the index and the description), ``reader``
(``CheckpointReader``), ``writer`` (``CheckpointWriter``: atomic, durable, never deletes what it
did not create). Reading never uses pickle or mmap: one read path, positional file reads
(``os.preadv``) straight into the caller's tensor at offsets from the checked header. Every
error about a file is a :class:`CheckpointFileError` (a ValueError) whose message starts with the
file's path and, where one is involved, the tensor's name.
"""

from quant.checkpoint.format import (
    DESCRIPTION_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    CheckpointFileError,
    FileChangedError,
    dtype_from_safetensors,
    parse_size,
)
from quant.checkpoint.reader import CheckpointReader
from quant.checkpoint.safetensors_file import SafetensorsFile, StoredTensor, TensorInfo
from quant.checkpoint.writer import CheckpointWriteError, CheckpointWriter, check_output_path

__all__ = [
    "DESCRIPTION_FILE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "CheckpointFileError",
    "CheckpointReader",
    "CheckpointWriteError",
    "CheckpointWriter",
    "FileChangedError",
    "SafetensorsFile",
    "StoredTensor",
    "TensorInfo",
    "check_output_path",
    "dtype_from_safetensors",
    "parse_size",
]
