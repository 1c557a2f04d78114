"""The number formats a span may compute in, coarsest first: names that records, routing and
the command line share (a module of its own, so that parsing arguments imports nothing heavy).

A peer's precision is its quantization when its linear layers are quantized, else its compute
dtype; ``--min-precision P`` accepts the peers at P or finer. (float16 keeps 10 mantissa bits
to bfloat16's 7.)
"""

PRECISIONS = ("nf4", "int8", "bfloat16", "float16", "float32")
