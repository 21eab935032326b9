"""Runs on disk, read back: a run dir, a checkpoint dir or `hf:<hub id or folder>` loaded with its
tokenizer, config and held-out tokens for sampling and the evals, and exported to transformers.

    load.py       load_run -> LoadedRun (model, tokenizer, config, checkpoint, val_tokens()),
                  resolve_checkpoint (a run dir -> its newest checkpoint), held_out_tokens
    export_hf.py  python -m runs.export_hf --ckpt RUN --out DIR: the transformers architecture that
                  computes the model exactly

Above model/, data/, configs/ and trainer/ (whose run-dir layout it reads); below eval/.
"""
