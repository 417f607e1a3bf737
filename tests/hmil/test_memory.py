"""The memory the feature cache may fill: a cgroup's limit (SLURM --mem, a container) bounds
what the OS reports available. cgroup trees are laid out under tmp_path."""

from hmil.training.memory import available_memory, cgroup_memory_left

GIB = 2**30


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_slurm_jobs_v2_limit_bounds_the_memory_of_its_step(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "0::/slurm/job_7/step_0\n")
    root = tmp_path / "sys"
    write(root / "slurm/job_7/memory.max", f"{16 * GIB}\n")  # --mem=16G
    write(root / "slurm/job_7/memory.current", f"{GIB}\n")
    write(root / "slurm/job_7/step_0/memory.max", "max\n")  # the step sets none itself
    write(root / "slurm/job_7/step_0/memory.current", f"{GIB}\n")
    write(root / "memory.max", "max\n")
    write(root / "memory.current", f"{100 * GIB}\n")
    assert cgroup_memory_left(proc, root) == 15 * GIB


def test_v1_memory_controller_and_its_unlimited_value(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "5:cpu,cpuacct:/job\n4:memory:/job\n")
    root = tmp_path / "sys"
    write(root / "memory/job/memory.limit_in_bytes", f"{8 * GIB}\n")
    write(root / "memory/job/memory.usage_in_bytes", f"{2 * GIB}\n")
    write(root / "memory/memory.limit_in_bytes", "9223372036854771712\n")  # no limit
    write(root / "memory/memory.usage_in_bytes", f"{50 * GIB}\n")
    assert cgroup_memory_left(proc, root) == 6 * GIB


def test_no_limit_or_no_cgroup_file_leaves_the_os_figure(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "0::/\n")
    write(tmp_path / "memory.max", "max\n")
    write(tmp_path / "memory.current", "12345\n")
    assert cgroup_memory_left(proc, tmp_path) is None
    assert cgroup_memory_left(tmp_path / "absent", tmp_path) is None
    assert available_memory(tmp_path / "no-such-root") > 2**20  # this machine's MemAvailable
