"""Uses what its layers put in /opt (tests/layers): a package, a program on PATH."""
import os
import subprocess

import layerpkg


def handler(event, context):
    try:
        open("/opt/written", "w").close()
        opt_writable = True
    except OSError:
        opt_writable = False
    return {
        "value": layerpkg.VALUE,
        "package": layerpkg.__file__,
        "tool": subprocess.run(["layer-tool", "hi"], capture_output=True, text=True,
                               check=True).stdout.strip(),
        "opt_writable": opt_writable,
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
    }
