"""How squall's runs look in the MLflow UI: the experiment's kind and the runs' names.

MLflow 3 opens an experiment on a GenAI overview (traces, evaluations) unless the experiment's
tag ``mlflow.experimentKind`` says it holds model training: the UI reads that tag (its values,
in mlflow 3.17's ``mlflow/server/js``: ``genai_development``, ``custom_model_development``,
``finetuning``) and shows ``custom_model_development`` experiments on their runs table. squall
sets it on every experiment it creates, and on an existing one that has no kind yet; a kind a user
chose in the UI is left alone.
"""

from __future__ import annotations

from datetime import datetime

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Model training and benchmarking: the UI opens on the runs table.
EXPERIMENT_KIND = "custom_model_development"


def mark_experiment(client, experiment_id: str, tags: dict[str, str] | None = None) -> None:
    """Give the experiment squall's kind unless it has one (``tags``: its current tags)."""
    if tags is None:
        tags = client.get_experiment(experiment_id).tags
    if not tags.get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def layout_name(model_parallel: int, data_parallel: int, ensemble: int = 1) -> str:
    """``mp<M>dp<D>``: ranks sharing one sample's graph, and data-parallel replicas; then
    ``ens<E>`` when ``E > 1`` ranks share each sample's ensemble members."""
    return f"mp{int(model_parallel)}dp{int(data_parallel)}" + (f"ens{int(ensemble)}"
                                                               if ensemble > 1 else "")


def run_name(job: str, graph: str, model: str, layout: str, when: datetime | None = None) -> str:
    """A run name that tells runs apart in the UI's table: what ran, on what, how, when.

    ``train-o32_l4-tiny-mp1dp1-20261130T101205``: job, graph, model, layout and the start time
    (local time, to the second).
    """
    stamp = (when or datetime.now()).strftime("%Y%m%dT%H%M%S")
    return f"{job}-{graph}-{model}-{layout}-{stamp}"
