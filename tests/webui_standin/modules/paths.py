"""Stand-in of A1111 v1.10.1 ``modules/paths.py`` (via ``paths_internal``): the webui's folders.
Tests set ``data_path``/``models_path`` with ``configure``; A1111 derives them from --data-dir."""

import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")


def configure(data_dir):
    global data_path, models_path, extensions_dir
    data_path = str(data_dir)
    models_path = os.path.join(data_path, "models")
    extensions_dir = os.path.join(data_path, "extensions")
