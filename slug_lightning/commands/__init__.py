"""The plain commands of ``python -m slug_lightning`` (those that are not Trainer runs): argument parsing,
checks of what the user gave, and printing; the work is done by the library modules they call.

Each module's ``main``-style functions take ``(argv, prog)`` and return an exit code;
:data:`slug_lightning.cli.PLAIN_COMMANDS` names them.

- :mod:`.compare`: ``compare`` (:mod:`slug_lightning.compare`);
- :mod:`.delta`: ``delta show|apply|remove|combine`` (:mod:`slug_lightning.deltas`);
- :mod:`.demo`: ``demo`` and ``make-world`` (:mod:`slug_lightning.demo`);
- :mod:`.export`: ``export-diffusers`` and ``export-llava`` (:mod:`slug_lightning.hf.export`);
- :mod:`.evaluate_hf`: ``eval-diffusion`` and ``eval-vlm`` (:mod:`slug_lightning.hf.evaluate`).

Nothing here is imported by ``import slug_lightning``.
"""
