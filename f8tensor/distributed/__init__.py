"""Float8 layers under torch.distributed: tensor parallelism (DTensor weights). FSDP2 needs no glue:
fully_shard over converted layers works as it does over nn.Linear."""
