"""Raw dataset -> preprocessed scene folders (see ``tools/preprocess.py`` and datasets/README.md).

Each dataset module exposes ``list_tasks(raw, out, ...) -> list[SceneTask]`` and a picklable
``process(task) -> dict[str, np.ndarray]``; ``common.run_tasks`` runs them.
"""
