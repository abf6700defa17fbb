"""Fixed evaluation benchmarks that are not sampled from a dataset's splits (Lake's one-shot runs), read with
fewshot.data's I/O layer and decoders."""
