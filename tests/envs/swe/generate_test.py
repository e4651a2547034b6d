"""The task generator is a reproducible command."""
import pathlib

from aem_jax.envs.swe import generate
from aem_jax.envs.swe.dataset import LOCAL_TASKS


def test_regeneration_matches_the_shipped_set(tmp_path):
    out = tmp_path / "tasks.jsonl"
    generate.main(["--seed", "0", "--out", str(out), "--repos", "intervals", "--per-repo", "2",
                   "--jobs", "2"])
    regenerated = out.read_text().splitlines()
    shipped = [line for line in pathlib.Path(LOCAL_TASKS).read_text().splitlines()
               if '"aem-jax-local__intervals-00' in line][:2]
    assert len(regenerated) == 2 and regenerated == shipped
