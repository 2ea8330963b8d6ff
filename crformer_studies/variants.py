"""What the ablation study trains: its variants and its setting."""

#: Variant name → config overrides. ``crformer-nq16`` is the full model. ``plain`` (N_q = 1, as in
#: the earlier studies) changes N_q too; ``plain-nq16`` is the plain decoder alone. ``lrm-pre-calibration``
#: is the full model with the LRM reading the last layer before its calibration.
VARIANTS: dict = {
    "crformer-nq16": ["model.num_queries=16"],
    "crformer-nq4": ["model.num_queries=4"],
    "crformer-nq1": ["model.num_queries=1"],
    "no-calibration": ["model.num_queries=16", "model.calibration=false"],
    "no-lrm": ["model.num_queries=16", "model.lrm=false"],
    "lrm-pre-calibration": ["model.num_queries=16", "model.lrm_input=pre_calibration"],
    "plain-nq16": ["model.num_queries=16", "model.calibration=false", "model.lrm=false"],
    "plain": ["model.num_queries=1", "model.calibration=false", "model.lrm=false"],
}


#: The study's setting on top of the default config: the default model (64² images), 2,000 training
#: scenes instead of 3,000 and 6 epochs (1,044 steps of batch 32, 3× the 348 of the first studies),
#: two runs at a time, one thread each (small CPU ops scale poorly across threads, and one thread
#: makes a run's numbers independent of the machine's core count).
STUDY: list = [
    "data.synthetic.train_images=2000",
    "train.epochs=6",
    "train.num_threads=1",
    "eval.language_check=false",
]
