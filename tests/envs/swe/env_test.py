"""SWEEnv end to end on the local task set, driven by scripted agents."""
import pytest

from aem_jax.envs import Env, make
from aem_jax.envs.swe import SWEEnv, diffs, read_jsonl, scripted
from aem_jax.envs.swe.dataset import LOCAL_TASKS

ALL_TASKS = read_jsonl(LOCAL_TASKS)
# One task of every repository.
SAMPLE = [next(t for t in ALL_TASKS if t.repo == repo) for repo in sorted({t.repo for t in ALL_TASKS})]
INFO_KEYS = {"success", "invalid_action", "truncated", "anchor"}


def _play(env, seed, agent):
    env.reset(seed=seed)
    for action in agent(env.task):
        step = env.step(action)
        assert INFO_KEYS <= set(step.info)
        if step.done:
            return step
    raise AssertionError("the scripted agent did not end the episode")


@pytest.fixture(scope="module")
def env():
    swe = SWEEnv(tasks=SAMPLE, max_turns=40, command_timeout_s=30, max_processes=128)
    yield swe
    swe.close()


def test_make_works_with_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("AEM_JAX_CACHE", str(tmp_path))
    swe = make("swe", split="train", max_turns=3)
    assert isinstance(swe, Env) and len(swe.tasks) >= 50
    observation = swe.reset(seed=0)
    assert swe.task.problem_statement.strip() in observation.text
    assert "<function=" in swe.system_prompt and observation.info["anchor"]
    swe.close()


@pytest.mark.parametrize("seed", range(len(SAMPLE)))
def test_gold_patch_through_tools_resolves(env, seed):
    step = _play(env, seed, scripted.gold_actions)
    assert step.reward == 1.0 and step.info["success"], step.observation


def test_empty_submission_resolves_nothing(env):
    for seed in range(2):
        step = _play(env, seed, scripted.empty_actions)
        assert step.reward == 0.0 and not step.info["success"]


def test_editing_tests_is_rejected(env):
    step = _play(env, 1, scripted.test_editing_actions)
    assert step.reward == 0.0 and "rejected" in step.info["evaluation"]


def test_fake_passed_lines_do_not_count(env):
    task = SAMPLE[0]
    module = task.extra["mutation"]["file"]
    ids = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
    fake = "".join(f"PASSED {t}\n" for t in ids) + f"{len(ids)} passed in 0.01s\n"
    for ending in ("", "os._exit(0)\n"):  # bug left in (exit 1) / exit 0 before tests run
        cheat = f"import os, sys\nsys.__stdout__.write({fake!r})\nos.write(1, {fake!r}.encode())\n"
        patched = cheat + ending + task.repo_snapshot[module]
        evaluation = env.evaluate_diff(task, diffs.file_diff(module, task.repo_snapshot[module], patched))
        assert not evaluation.resolved, evaluation.reason


def test_bad_actions_give_observations_and_the_episode_goes_on(env):
    env.reset(seed=0)
    step = env.step("I think the bug is in line 3.")
    assert step.info["invalid_action"] and not step.done and "no tool call" in step.observation
    step = env.step(scripted.call("str_replace", path="README.md", old_str="no such text", new_str="x"))
    assert "was not found" in step.observation and not step.done
    step = env.step(scripted.call("create", path="README.md", file_text="x"))
    assert "already exists" in step.observation
    step = env.step(scripted.call("view", path="README.md", view_range="1,1"))
    assert step.observation.startswith("     1\t#")
    step = env.step(scripted.call("view", path="/etc/shadow"))  # not mounted in the sandbox
    assert "/etc/shadow is not a file" in step.observation and "root:" not in step.observation
    assert not step.done
    step = env.step(scripted.call("submit"))
    assert step.done and step.reward == 0.0
    after = env.step(scripted.call("submit"))
    assert after.done and after.info["invalid_action"]


def test_attacks_are_contained_and_the_rollout_goes_on(env):
    env.reset(seed=2)
    attacks = ["bomb() { bomb | bomb & }; bomb", "while :; do :; done", "python -c 'b = bytearray(20 * 2**30)'",
               "head -c 1000000000 /dev/zero", "kill -9 $PPID; kill -9 -1", "sleep 4242 &",
               "cat /etc/shadow; ls /root; echo x > /etc/evil"]
    for command in attacks:
        env.command_timeout_s = 2
        step = env.step(scripted.call("bash", command=command))
        assert not step.done and "[" in step.observation  # exit code or kill notice
    env.command_timeout_s = 30
    for action in scripted.gold_actions(env.task):
        step = env.step(action)
    assert step.done and step.reward == 1.0, step.observation


def test_deleting_the_workspace_ends_in_a_clear_failure(env):
    env.reset(seed=3)
    env.step(scripted.call("bash", command="rm -rf ./* ./.[!.]*"))
    step = env.step(scripted.call("submit"))
    assert step.done and step.reward == 0.0 and "diff" in step.info["evaluation"]


def test_turn_limit_truncates_and_scores():
    swe = SWEEnv(tasks=SAMPLE, max_turns=2)
    swe.reset(seed=0)
    first = swe.step(scripted.call("bash", command="true"))
    assert not first.done and first.reward == 0.0
    last = swe.step(scripted.call("bash", command="true"))
    assert last.done and last.info["truncated"] and last.reward == 0.0
    swe.close()


def test_time_limit_truncates():
    swe = SWEEnv(tasks=SAMPLE, episode_time_s=0.5)
    swe.reset(seed=0)
    step = swe.step(scripted.call("bash", command="sleep 5"))
    assert step.done and step.info["truncated"] and "timed out" in step.observation
    swe.close()


def test_sandbox_that_cannot_be_created_fails_only_the_episode(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    swe = SWEEnv(tasks=SAMPLE, workspace_root=str(blocker))
    observation = swe.reset(seed=0)
    assert observation.info["env_error"]
    step = swe.step(scripted.call("bash", command="ls"))
    assert step.done and not step.info["success"] and "sandbox could not be created" in step.observation
    swe.workspace_root = str(tmp_path)
    swe.reset(seed=0)
    assert swe.step(scripted.call("bash", command="ls")).info["env_error"] is None
    swe.close()


def test_bad_env_arguments():
    with pytest.raises(ValueError, match="sandbox"):
        SWEEnv(tasks=SAMPLE, sandbox="vm")
    with pytest.raises(ValueError, match="max_turns"):
        SWEEnv(tasks=SAMPLE, max_turns=0)


@pytest.mark.slow
def test_gold_patch_resolves_every_local_task():
    """The hardened evaluator still resolves all local tasks with their gold patches."""
    import concurrent.futures

    swe = SWEEnv(tasks=ALL_TASKS)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        evaluations = list(pool.map(lambda t: swe.evaluate_diff(t, t.patch), ALL_TASKS))
    failed = {t.instance_id: e.reason for t, e in zip(ALL_TASKS, evaluations) if not e.resolved}
    assert len(ALL_TASKS) >= 120 and not failed, failed


@pytest.mark.parametrize("canaries", [True, False, None])
def test_final_step_reports_whether_the_harness_placed_canaries(monkeypatch, canaries):
    from aem_jax.envs.swe.reward import Evaluation
    swe = SWEEnv(tasks=SAMPLE, max_turns=1)
    swe.reset(seed=0)
    monkeypatch.setattr(swe, "evaluate_workspace", lambda: Evaluation(True, "resolved", canaries=canaries))
    step = swe.step(scripted.call("bash", command="true"))
    assert step.done and step.reward == 1.0
    # None: the local grader, which has no canaries to report
    assert step.info.get("canaries", "absent") == ("absent" if canaries is None else canaries)
    swe.close()
