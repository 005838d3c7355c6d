"""Hugging Face transformers adapter: tensor-parallel swapping of a model's ``nn.Linear`` layers
by its tensor-parallel plan, and sharded loading of a model directory.

    import tp_layers
    tp = tp_layers.init_tp()                              # torchrun: the world group
    model = tp_layers.load_pretrained("path/to/model")    # this rank's shards only
    model.generate(ids, max_new_tokens=32)                # prefill fused, decode unfused

    model = tp_layers.parallelize(hf_model, quant=W8A16())  # an already built model

The default plan is what transformers 5.x builds (``distributed/mixin.py``
``init_parallel_plans``): ``config.base_model_tp_plan`` (keys relative to the base model, e.g.
``"layers.*.self_attn.q_proj"``), the CausalLM's ``_tp_plan`` (``lm_head``) and
``embedding_rowwise`` for the input embedding. Styles (``distributed/tensor_parallel.py``):

==============================================  =================================================
style                                           what parallelize does
==============================================  =================================================
``colwise``, ``local_colwise``                  ColumnParallelLinear (output sharded, heads local)
``colwise_rep``, ``colwise_gather_output``      ColumnParallelLinear(gather_output=True)
``rowwise``, ``local_rowwise``                  RowParallelLinear (input sharded; fused prefill)
``rowwise_rep``, ``rowwise_split_input``        RowParallelLinear(input_is_parallel=False)
``packed_colwise``, ``local_packed_colwise``    MergedColumnParallelLinear, 2 equal segments
                                                (a packed gate_up: rank r holds [gate_r | up_r])
``embedding_rowwise``                          VocabParallelEmbedding (vocab rows sharded,
                                                lookups all-reduced)
``colwise_gather_output`` etc. on the output    ParallelLMHead (vocab-sharded, logits gathered;
embedding (``lm_head``)                         ``colwise``: the local shard); a tied lm_head
                                                shares the embedding's sharded weight
``replicate``, ``replicated_with_grad_allreduce``,
``sequence_parallel``, ``gather``, ``local``,   left as is, replicated (norms see the full
``isolated``, ``embedding_colwise``             sequence unless parallelize(sequence_parallel=
                                                True): ``tp_layers.hf.sequence_parallel``)
anything else (``packed_rowwise``, MoE / expert
styles, ``mla_kv_a_proj``, ``all_reduce``,      refused with an error naming the plan entry
``local_params``, unknown names)
==============================================  =================================================

A user ``plan`` is a dict of module-name globs (``fnmatch``) to ``"colwise"`` / ``"rowwise"``
(or any style above); a key may be relative to the model given (``"model.layers.*.mlp.up_proj"``)
or to its base model (``"layers.*.mlp.up_proj"``).

Attention keeps working with local head counts: a column-sharded q projection gives each rank
``heads / tp`` whole heads (the heads must divide), k / v projections are sharded by kv head, and
with fewer kv heads than ranks each kv head is replicated on ``tp / kv`` ranks (rank r holds kv
head ``r * kv // tp``); ``pad_heads=True`` pads head counts that do not split with zero heads
(``tp_layers.hf.heads``). The attention module's head-count attributes (``num_key_value_groups``,
``num_heads``, ``num_key_value_heads``, ...) are set to the local counts. The model's config is
left untouched (a StaticCache sized from it would not fit; generate's default DynamicCache does).

Modules: ``plan`` (styles, default plan, matching), ``quantize`` (schemes, calibration),
``heads`` (head math, padding), ``swap`` (``parallelize``), ``pretrained``
(``load_pretrained``), ``sequence_parallel`` (token-sharded hidden states between the decoder
layers). transformers is imported only in this package; ``import tp_layers``
works without it.
"""

from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tp_layers.hf.plan import LayerPlan, default_plan, resolve_plan
from tp_layers.hf.pretrained import checkpoint_dtype, load_pretrained
from tp_layers.hf.swap import parallelize
from tp_layers.linear import HeadReplicatedColumnLinear

__all__ = [
    "HeadReplicatedColumnLinear",
    "LayerPlan",
    "ParallelLMHead",
    "VocabParallelEmbedding",
    "checkpoint_dtype",
    "default_plan",
    "load_pretrained",
    "parallelize",
    "resolve_plan",
]
