"""Every shell command line UGRO runs on a node, built in this one package.

Each value passes through `shlex.quote` (or `rpath` for paths, which keeps a
leading `~/` meaning the node's own home). The scripts are POSIX sh and use
only what every Linux node has: coreutils, grep, and /proc.

`shell`: quoting and the exit marker; `probe`: the questions put to a node (health,
preflight, the monitor's sample); `job`: a job's processes and files on a node;
`sync`: rsync, environment installs, the environment fingerprint. Callers use
`commands.<name>` whichever room it lives in.
"""

from .job import (  # noqa: F401
    RDZV_STORE,
    TORCHRUN_STATIC,
    job_output,
    job_path,
    job_state,
    kill_all_jobs,
    kill_job,
    list_files,
    make_project_dirs,
    node_job_dir,
    node_job_dirs,
    read_file,
    start_job,
    watch_job,
)
from .probe import (  # noqa: F401
    GPU_QUERY,
    MONITOR_MARK,
    PORTS_MARK,
    PROBE_END,
    PROBE_SOURCE,
    SCRIPT_MARK,
    free_space,
    listening_ports,
    monitor_sample,
    preflight_checks,
    probe,
)
from .shell import (  # noqa: F401
    EXIT_MARKER,
    MARKER_PRINTF,
    MARKER_SPAN,
    in_project,
    join,
    q,
    rpath,
)
from .sync import (  # noqa: F401
    ENV_PREFIX,
    ENV_PROBE,
    NO_PIXI,
    NO_RSYNC,
    env_fingerprint,
    pixi_install,
    rsync,
    rsync_dest,
    rsync_receiver,
    ssh,
    ssh_option,
    ssh_transport,
    venv_install,
)
