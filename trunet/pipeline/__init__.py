"""The pipeline: the stages a trained model goes through, one package each.

- :mod:`trunet.pipeline.checkpoint` -- the self-contained checkpoint file (written by training, read by
  inference);
- :mod:`trunet.pipeline.inference` -- whole cines through the network (sliding and time windows),
  post-processing, ``trunet predict``;
- :mod:`trunet.pipeline.evaluation` -- Dice/HD95, volumes and clinical indices, reports, ``trunet evaluate``;
- :mod:`trunet.pipeline.training` -- losses, schedule, the trainer and its validation, ``trunet train``;
- :mod:`trunet.pipeline.planning` -- memory estimate and patch search, ``trunet plan``;
- :mod:`trunet.pipeline.precision` -- the one autocast-dtype decision they share.

Values flow config -> io -> data -> transforms -> model -> training -> checkpoint -> inference -> evaluation.
Imports never run back down that chain into a package that imports its importer: validation reuses the
inference stage's predictor and the evaluation stage's metrics, so training imports those two stages (and
planning imports training's loss); nothing they contain imports training or planning. The modules left at
the old flat paths (``train.py``, ``infer.py``, ``evaluate.py``, ``plan.py``, ``data.py``, ``config.py``, ...)
only re-export their new homes.
"""
