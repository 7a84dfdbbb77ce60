"""The float8 core, in the order a tensor meets it: config -> tensor (Float8Tensor) -> ops (op table,
GEMM routing) -> linear (Float8Linear) -> convert (convert_to_float8_training); tensor_cache and
weight_cache remember quantizations so that they are not repeated; weight_amax and weight_cache keep
their per-weight entries on the weight itself (weight_attr)."""
