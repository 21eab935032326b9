"""What the trainer measures on a model while it trains, on fixed held-out inputs.

    sink.py       attention weights stacked per layer, Gu et al.'s Sink_1, Qiu et al.'s F-Attn and the
                  max |h| / median |h| ratio of the residual stream (`measure`, one forward)
    sequences.py  the fixed held-out windows the probes and the evals read (`held_out_sequences`)

A leaf: nothing here imports the rest of the project, so trainer/ and eval/ both build on it
(eval.sink is the full evaluation with its plots and CLI; it reuses these definitions).
"""
