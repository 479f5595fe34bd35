"""Importing this module imports TensorFlow without its start-up chatter on stderr.

TensorFlow's C++ runtime writes a few lines (the absl notice, oneDNN, the CUDA
stub on a machine without a GPU) before its logging is set up, so neither
TF_CPP_MIN_LOG_LEVEL nor absl's flags can hold them back. train.py imports this
first; every other line TensorFlow writes while loading still reaches stderr.
"""

import os
import re
import sys
import tempfile

_CHATTER = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on"
    r"|cudart_stub\.cc|Could not find cuda drivers|Unable to register cu\w+ factory"
    r"|This TensorFlow binary is optimized|cuda_executor|failed call to cuInit")


def _import_tensorflow():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow

            # Looking for GPUs loads the CUDA stub, which reports the missing driver.
            tensorflow.config.list_physical_devices("GPU")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not _CHATTER.search(line):
                    print(line, file=sys.stderr)


_import_tensorflow()
