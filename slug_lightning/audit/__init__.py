"""Auditing an unlearned model ("does it stay forgotten?"): probes the step-size search never ran.

The search (METHOD §6) calls a concept forgotten when its forget accuracy under the evaluation sets' own templates
drops to the threshold. The audit asks again in ways the edit was not chosen for:

- :mod:`~slug_lightning.audit.prompts`: forget and test accuracy under held-out templates
  (``slug_lightning/audit/templates.txt``), and forget accuracy with an alias or paraphrase in place of the
  class name;
- :mod:`~slug_lightning.audit.retrieval`: searching the evaluation images by the concept's name;
- :mod:`~slug_lightning.audit.probe`: a linear probe on the image features, the concept against its look-alikes;
- :mod:`~slug_lightning.audit.verdicts`: how the concept's image–text cosines moved, and one verdict line per
  concept; :mod:`~slug_lightning.audit.measure` gathers one concept's measures for it.

The measures are small pure functions of tensors; the functions that run a model read one
:class:`~slug_lightning.audit.prompts.AuditEvaluator`, a zero-shot evaluator run once per model.
"""

# public name -> its submodule; imported on first use, so that the audit's settings load without torch
_LAZY = {
    "AuditEvaluator": "prompts",
    "audit_evaluator": "prompts",
    "ensemble_templates": "prompts",
    "held_out_templates": "prompts",
    "image_probe": "probe",
    "linear_probe_accuracy": "probe",
    "measure_concept": "measure",
    "name_accuracy": "prompts",
    "other_names": "prompts",
    "query_embedding": "retrieval",
    "recoveries": "verdicts",
    "retrieval_scores": "retrieval",
    "search_by_name": "retrieval",
    "set_counts": "prompts",
    "similarity_shift": "verdicts",
    "stratified_folds": "probe",
    "template_accuracy": "prompts",
    "template_key": "prompts",
    "unseen_prompt_accuracy": "prompts",
    "verdict": "verdicts",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'slug_lightning.audit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"slug_lightning.audit.{_LAZY[name]}"), name)


__all__ = [
    "AuditEvaluator",
    "audit_evaluator",
    "ensemble_templates",
    "held_out_templates",
    "image_probe",
    "linear_probe_accuracy",
    "measure_concept",
    "name_accuracy",
    "other_names",
    "query_embedding",
    "recoveries",
    "retrieval_scores",
    "search_by_name",
    "set_counts",
    "similarity_shift",
    "stratified_folds",
    "template_accuracy",
    "template_key",
    "unseen_prompt_accuracy",
    "verdict",
]
