"""Stand-in of A1111 v1.10.1 ``modules/shared.py``: ``cmd_opts`` (the parsed command line, with the
flags the extension reads and their A1111 defaults) and ``opts`` (settings; ``sd_model_checkpoint``
is the selected checkpoint's title)."""

import argparse
import os

from modules import paths

cmd_opts = argparse.Namespace()
demo = None


class Options:
    """A1111's ``shared.opts``: settings by attribute, stored in ``data``."""

    def __init__(self):
        self.data = {"sd_model_checkpoint": None, "list_hidden_files": True}

    def __getattr__(self, item):
        if item != "data" and item in self.data:
            return self.data[item]
        raise AttributeError(item)


opts = Options()


def configure(data_dir, lora_dir=None, embeddings_dir=None, api_auth=None, ckpt_dir=None):
    """Set the folders as A1111 derives them from --data-dir (--lora-dir comes from the built-in
    Lora extension's preload.py, default models/Lora)."""
    paths.configure(data_dir)
    cmd_opts.data_dir = str(data_dir)
    cmd_opts.ckpt_dir = ckpt_dir
    cmd_opts.ckpt = None
    cmd_opts.lora_dir = lora_dir or os.path.join(paths.models_path, "Lora")
    cmd_opts.embeddings_dir = embeddings_dir or os.path.join(paths.data_path, "embeddings")
    cmd_opts.api_auth = api_auth
    cmd_opts.skip_install = False
