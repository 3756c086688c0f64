"""What the server and offline evaluation both run to decode: one code path, so their tokens agree.

The ragged runners over a slot KV cache (`runtime.runners`), one step's logits for every head with a
shared LM-head product (`runtime.head_logits`), and the continuous-batching loop offline work decodes
with (`runtime.batch_decode`). It sits below `server/` and `training/` and depends only on `heads/`:
the server's engine adds requests, streaming and failure isolation on top; `training.decoding` adds
evaluation's prompts and seeds. Greedy evaluation therefore returns exactly what the server returns.
"""
