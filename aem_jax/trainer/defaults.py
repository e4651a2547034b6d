"""Every field of a training config, with its meaning and default value.

Config files under ``configs/`` start from ``base()`` and change what differs,
so a field is documented once, here. Unknown keys given on the command line
(``--config.a.b=v``) fail before anything is built, naming the key.
"""
from ml_collections import ConfigDict


def base() -> ConfigDict:
    """Every field of a training config, with its meaning."""
    c = ConfigDict()
    c.seed = 0                       # root of every random stream (rollouts, init, shuffles)
    c.algorithm = "grpo"             # grpo | dr_grpo | dapo | gspo | rloo | gigpo | ppo | archer | etpo | sft
    c.total_steps = 250              # training iterations (one rollout batch each)
    c.env_steps_budget = 0           # > 0: training also ends after the first step whose cumulative environment
                                     # steps (turns played, DAPO's extra batches included) reach this many;
                                     # compares methods at equal environment steps. 0: total_steps only
    c.progress_bar = False           # force the progress bar on (it shows anyway on a terminal)
    c.max_nonfinite_in_a_row = 5     # stop after this many skipped (non-finite) updates in a row
    c.distributed = False            # force jax.distributed.initialize() (auto-detected otherwise)

    c.env = ConfigDict()
    c.env.name = "treasure"          # registered environment (aem_jax.envs.registered())
    c.env.kwargs = ConfigDict()      # keyword arguments of aem_jax.envs.make
    c.env.kwargs.num_boxes = 4       # boxes in the room
    c.env.kwargs.num_clues = 1       # notes to follow before the gold
    c.env.kwargs.max_turns = 2       # turns before the game ends as lost (2 = read, then open)

    c.model = ConfigDict()
    c.model.source = "scratch"       # "scratch" (word-level tokenizer from the env) or HF dir / hub id
    c.model.model_type = "qwen3"     # architecture of a scratch model: qwen2 | qwen3 | llama
    c.model.hidden_size = 64         # D of a scratch model
    c.model.intermediate_size = 192  # MLP width of a scratch model
    c.model.num_layers = 2           # decoder blocks of a scratch model
    c.model.num_heads = 4            # attention heads of a scratch model
    c.model.num_kv_heads = 2         # key/value heads (GQA) of a scratch model
    c.model.head_dim = 16            # per-head size of a scratch model
    c.model.tie_embeddings = True    # share embedding and unembedding
    c.model.dtype = "float32"        # compute (activation and matmul) dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # storage dtype of parameters and optimiser state: float32 | bfloat16;
                                     # float32 master weights keep updates of lr ~1e-6 that bfloat16 rounds away
    c.model.remat = "none"           # layer rematerialisation: none | dots (save matmul outputs) | full | offload (TPU/GPU)
    c.model.attention = "auto"       # attention kernel: auto (splash on TPU, cudnn on GPU, blockwise for long
                                     # rows on CPU) | xla | blockwise | splash | cudnn (aem_jax/models/attention.py)
    c.model.tokenizer = "auto"       # scratch tokenizer: auto (word-level if the env has a vocabulary, else bpe) | word | bpe
    c.model.bpe_vocab_size = 512     # vocabulary of a scratch byte-level BPE tokenizer
    c.model.tokenizer_corpus_tasks = 8  # first observations of this many tasks train the BPE tokenizer

    c.rollout = ConfigDict()
    c.rollout.num_tasks = 64         # N tasks per batch (fewer: noisier steps; 32 often stalls at 1/4 success)
    c.rollout.group_size = 8         # G rollouts per task (B = N * G episodes)
    c.rollout.max_turns = 2          # turns before an episode is truncated
    c.rollout.history = "concatenated"  # concatenated | windowed
    c.rollout.window = 2             # h past turns kept in windowed mode
    c.rollout.max_context_tokens = 128  # T: longest prompt + action of a turn (also the KV cache)
    c.rollout.max_action_tokens = 6  # tokens one action may take
    c.rollout.overlong_actions = "invalid"  # an action cut at max_action_tokens: "invalid" | "play" (parse it)
    c.rollout.seq_bucket = 32        # 0: pad every batch to max_context_tokens (one compile); k > 0: to the
                                     # next multiple of k above its longest row (less padding, <= T/k compiles)
    c.rollout.invalid_penalty = 0.05  # subtracted from the reward of an invalid action
    c.rollout.temperature = 1.0      # sampling temperature (0 = greedy)
    c.rollout.top_k = 0              # 0 = off
    c.rollout.top_p = 1.0            # 1 = off
    c.rollout.step_timeout_s = 30.0  # an env step slower than this ends its episode as failed
    c.rollout.num_threads = 8        # threads stepping environments
    c.rollout.system_prompt = ""     # optional system message
    c.rollout.action_pattern = ""    # optional regex extracting the action from the reply
    c.rollout.enable_thinking = "template"  # reasoning switch of templates that read it (Qwen3):
                                     # template (its default) | on | off
    c.rollout.observation_role = "user"  # role of observations in the chat: user | tool (tool results)
    c.rollout.engine = "continuous"  # continuous (KV cache kept across turns, no lockstep) | simple (re-prefill)
    c.rollout.endpoint = ""          # OpenAI-compatible server to sample from (python -m aem_jax.serve, vLLM,
                                     # SGLang), e.g. http://127.0.0.1:8000; "" = the in-process sampler
    c.rollout.reload_route = "/update_weights_from_disk"  # POST {"model_path": DIR} route that loads pushed weights
    c.rollout.weights_dir = ""       # where weights are saved for the endpoint to load ("" = a temporary dir;
                                     # the server must be able to read it: same machine or shared file system)

    c.advantage = ConfigDict()
    c.advantage.normalize_std = True   # GRPO divides by the group std (False: Dr.GRPO)
    c.advantage.gamma = 0.95           # GiGPO step-return discount
    c.advantage.gigpo_step_weight = 1.0  # GiGPO weight of the step-level advantage

    c.aem = ConfigDict()
    c.aem.enabled = True             # rescale advantages by AEM's alpha (2605.00425)
    c.aem.lam = 1.0                  # modulation strength; alpha in (e^-lam, e^lam); < 0 reverses
    c.aem.min_range = 0.1            # groups with an entropy range below this keep alpha = 1
    c.aem.scope = "group"            # group | batch | trajectory
    c.aem.signal = "mean_token_entropy"  # mean_token_entropy | surprisal_per_token
    c.aem.shuffle = False            # ablation: shuffle alpha within each group

    c.loss = ConfigDict()
    c.loss.clip_low = 0.2            # PPO ratio clip below 1
    c.loss.clip_high = 0.2           # PPO ratio clip above 1 (DAPO: 0.28)
    c.loss.dual_clip = 0.0           # dual-clip constant c > 1 (0 = off)
    c.loss.agg = "token-mean"        # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    c.loss.entropy_coef = 0.01       # entropy bonus weight (keeps the digit choice open until the copy is learnt)
    c.loss.entropy_mask = "all"      # tokens the bonus covers: all | nonzero_advantage (only responses with
                                     # A != 0: groups whose rollouts all got the same return get no bonus)
    c.loss.kl_coef = 0.0             # KL-to-reference weight (0 = no reference model)
    c.loss.kl_kind = "low_var_kl"    # k1 | k2 | k3 | low_var_kl
    c.loss.chunk_size = 1024         # tokens per chunk of the log-prob computation

    c.ppo = ConfigDict()
    c.ppo.value_coef = 0.5           # value-loss weight (algorithm=ppo)
    c.ppo.gamma = 0.95               # turn-level discount of bi-level GAE
    c.ppo.lam = 0.95                 # turn-level GAE lambda
    c.ppo.token_lam = 1.0            # token-level GAE lambda inside a turn
    c.ppo.whiten_advantages = True   # whiten GAE advantages over the batch's agent tokens (False: raw GAE)

    c.dapo = ConfigDict()
    c.dapo.max_resample = 2          # extra rollout batches to refill uninformative groups

    c.archer = ConfigDict()          # algorithm=archer (2402.19446): utterance critic + token actor
    c.archer.gamma = 0.95            # discount between utterances in the critic's TD targets
    c.archer.tau = 0.1               # Polyak weight of the online critic in each target update
    c.archer.critic_steps = 10       # critic updates per iteration (paper: 50; fewer keeps CPU iterations short)
    c.archer.actor_steps = 3         # actor updates per iteration (paper: 3)
    c.archer.actor_warmup = 5        # first iterations train only the critic (paper: 10-20)
    c.archer.actor_clip = 0.2        # PPO clip eps of the actor's ratio to the behaviour policy (0: the
                                     # paper's unclipped REINFORCE, which can undo a learnt policy)
    c.archer.center_advantages = False  # True: the actor's utterance advantages minus their batch mean (a
                                     # constant baseline; removes the critic's Q - V offset; not in the paper)
    c.archer.buffer_episodes = 4096  # replay buffer capacity in episodes (FIFO)
    c.archer.critic_minibatch_size = 32  # replayed episodes (and as many fresh ones) per critic step
    c.archer.critic_learning_rate = 1e-3  # critic AdamW learning rate (schedule etc. from c.optim)
    c.archer.critic = ConfigDict()   # the critic's own decoder trunk (same vocabulary and family)
    c.archer.critic.from_policy = False  # True: trunk = a copy of the initial policy (its sizes; below ignored)
    c.archer.critic.hidden_size = 64     # D of the critic trunk
    c.archer.critic.intermediate_size = 128  # MLP width of the critic trunk
    c.archer.critic.num_layers = 2       # decoder blocks of the critic trunk
    c.archer.critic.num_heads = 4        # attention heads of the critic trunk
    c.archer.critic.num_kv_heads = 2     # key/value heads of the critic trunk
    c.archer.critic.head_dim = 16        # per-head size of the critic trunk
    c.archer.critic.head_width = 64      # hidden width of each Q_k / V_k MLP head

    c.etpo = ConfigDict()            # algorithm=etpo (2402.06700): token-level soft Q learning
    c.etpo.beta = 0.01               # KL(pi || reference) weight; pi* is proportional to rho exp(Q / beta)
    c.etpo.gamma = 0.95              # discount between turns (none inside a response)
    c.etpo.tau = 0.005               # Polyak weight of the online Q in each target-Q update
    c.etpo.huber_delta = 10.0        # Huber threshold of the Q loss
    c.etpo.q_learning_rate = 1e-3    # Q-network AdamW learning rate (schedule etc. from c.optim)
    c.etpo.q_steps = 1               # Q steps (each + a Polyak step) per minibatch before its policy step
    c.etpo.policy_warmup = 0         # first iterations train only Q (no policy step; ArCHer's critic warm-up)
    c.etpo.q = ConfigDict()          # the Q network: its own decoder, logits = Q over the vocabulary
    c.etpo.q.from_policy = False     # True: Q starts as a copy of the initial policy (its sizes; below ignored)
    c.etpo.q.residual = False        # with from_policy: Q = its logits minus the reference policy's (Q = 0 at
                                     # the start, on the policy's features; for warm starts)
    c.etpo.q.hidden_size = 64        # D of the Q network
    c.etpo.q.intermediate_size = 128  # MLP width of the Q network
    c.etpo.q.num_layers = 2          # decoder blocks of the Q network
    c.etpo.q.num_heads = 4           # attention heads of the Q network
    c.etpo.q.num_kv_heads = 2        # key/value heads of the Q network
    c.etpo.q.head_dim = 16           # per-head size of the Q network

    c.sft = ConfigDict()             # algorithm=sft: behaviour cloning of the env's scripted expert
    c.sft.noise = 0.0                # share of demonstration actions replaced by a uniformly random valid
                                     # action (weaker, higher-entropy warm starts); total_steps is its length

    c.learner = ConfigDict()
    c.learner.epochs = 1              # passes over each rollout batch
    c.learner.minibatch_size = 128    # rows per optimiser step
    c.learner.microbatch_size = 0     # rows per gradient-accumulation micro-batch (must divide minibatch_size;
                                      # 0 = the whole minibatch at once): same update, 1/k of the activations
    c.learner.max_kl = 0.0            # policy-gradient family: reject a step whose KL(old||new) on its own batch,
                                      # measured after its last minibatch, exceeds this (0 = off; costs a copy
                                      # of parameters and optimiser state and one forward pass per step)

    c.optim = ConfigDict()
    c.optim.learning_rate = 1e-3     # AdamW peak learning rate (2e-3 learns faster but can collapse, docs/results.md)
    c.optim.warmup_steps = 5         # linear warm-up (optimiser steps)
    c.optim.schedule = "constant"    # after warm-up: constant | cosine (decay to final_lr_fraction * peak)
    c.optim.final_lr_fraction = 0.1  # cosine: learning rate at the end, as a fraction of the peak
    c.optim.success_gate = 0.0       # > 0: times clip((1 - s) / (1 - gate), final_lr_fraction, 1), s = the
                                     # step's rollout success: full rate until success passes the gate, then
                                     # down to final_lr_fraction as it nears 1 (0 = off; the policy's optimiser,
                                     # every algorithm)
    c.optim.decay_steps = 0          # cosine: optimiser steps from start to end (0: total_steps x
                                     # optimiser steps per training step of the nominal rollout batch)
    c.optim.b1 = 0.9                 # AdamW first-moment decay
    c.optim.b2 = 0.99                # AdamW second-moment decay
    c.optim.eps = 1e-8               # AdamW epsilon
    c.optim.weight_decay = 0.0       # AdamW decoupled weight decay
    c.optim.grad_clip = 1.0          # global-norm gradient clipping

    c.mesh = ConfigDict()
    c.mesh.data = -1                 # data-parallel axis (-1: all remaining devices)
    c.mesh.fsdp = 1                  # parameter-sharding axis
    c.mesh.tensor = 1                # tensor-parallel axis

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 10          # save every this many steps (and at the end)
    c.checkpoint.keep = 3            # checkpoints kept

    c.eval = ConfigDict()
    c.eval.num_tasks = 64            # held-out tasks per evaluation, before and after training (0 = no evaluation)
    c.eval.every = 0                 # also evaluate every this many steps (0 = only before and after training)
    c.eval.samples_per_task = 1      # n sampled episodes per held-out task (pass@k needs n >= k)
    c.eval.pass_at = (1,)            # k of the unbiased pass@k estimates logged as eval/pass@k (Chen et al. 2021)
    c.eval.split = ""                # envs with splits (swe): the held-out split ("" = "test"; never the training
                                     # split); envs without: disjoint held-out task seeds, this must stay ""

    c.records = ConfigDict()
    c.records.transcripts_every = 0  # every this many steps write the step's episodes to
                                     # workdir/transcripts/step_000100.jsonl for step 100 (0 = off)
    c.records.eval_transcripts = True  # write each evaluation's episodes to transcripts/eval_000100.jsonl

    c.export = ConfigDict()
    c.export.enabled = False         # export the policy as a Hugging Face directory (transformers, vLLM)
    c.export.every = 0               # every this many steps to workdir/export/step_000100 (0 = only at the end);
                                     # the end of training always writes workdir/export/final
    c.export.dtype = "float32"       # dtype of the exported weights: float32 | bfloat16
    return c


def textworld(c: ConfigDict) -> ConfigDict:
    """Switches a config in place to TextWorld games (generated with tw-make, no download).

    A coin-collector game with its admissible commands listed and numbered, a byte-level
    BPE tokenizer trained on observations and a 96-wide scratch model. The
    history is windowed (observations are long); algorithms that need whole
    episodes in one row (ppo, archer, etpo) set ``rollout.history`` back to
    "concatenated" after calling this.
    """
    c.env.name = "textworld"
    c.env.kwargs = ConfigDict({
        "challenge": "tw-coin_collector",  # tw-simple | tw-coin_collector | tw-treasure_hunter | tw-cooking
        "level": 2,                        # difficulty of the generated game (2: go to the next room, take the coin)
        "admissible_commands": True,       # list valid commands in each observation
        "numbered_commands": True,         # number them; an action "k" plays command k
        "max_steps": 8,                    # game steps before the engine ends the episode
        "game_pool": 32,                   # task seed s plays game s % 32 (made once; 0 = a new game per seed)
    })
    c.model.tokenizer = "bpe"
    c.model.bpe_vocab_size = 768
    c.model.hidden_size = 96
    c.model.intermediate_size = 288
    c.model.num_layers = 2
    c.rollout.num_tasks = 8
    c.rollout.group_size = 8
    c.rollout.max_turns = 6
    c.rollout.history = "windowed"
    c.rollout.window = 2
    c.rollout.max_context_tokens = 512
    c.rollout.seq_bucket = 128
    c.rollout.max_action_tokens = 12
    c.rollout.overlong_actions = "play"  # a scratch model over 768 tokens rarely ends a turn within 12
    c.rollout.invalid_penalty = 0.05
    c.learner.minibatch_size = 32
    c.eval.num_tasks = 16
    return c


def longhorizon(c: ConfigDict) -> ConfigDict:
    """Switches a config in place to the long-horizon dungeon (aem_jax/envs/dungeon.py).

    6 rooms, a trail of 3 notes, 2 keys; the scripted expert escapes in 9
    turns, a uniformly random player almost never (0.04 % of 100,000 seeds),
    and the episode is cut at 12 turns. Every turn is appended to one row
    ("concatenated" history, which ppo, archer and etpo need): an expert
    episode is 245 word-level tokens with the chat markup, one that wastes 3
    turns on the game's longest message 353, hence 512-token rows. From random
    weights success stays near 0: start from a supervised warm start
    (``model.source``, configs/sft.py:longhorizon).
    """
    c.env.name = "dungeon"
    c.env.kwargs = ConfigDict({"num_rooms": 6, "num_notes": 3, "num_keys": 2, "max_turns": 12})
    c.rollout.max_turns = 12                 # = env max_turns: expert 9 turns + 3 spare
    c.rollout.history = "concatenated"
    c.rollout.max_context_tokens = 512       # intro + 12 observation/action turns with chat markup
    c.rollout.seq_bucket = 64                # rows padded to the next multiple of 64 above the longest
    c.rollout.max_action_tokens = 6          # "go to room 4" + end of turn is 5 word-level tokens
    c.rollout.num_tasks = 16                 # x 8 rollouts = 128 episodes, ~1500 turns per step
    c.learner.minibatch_size = 32
    c.eval.num_tasks = 32
    return c


VARIANTS = ("smoke", "textworld", "longhorizon")
ENVIRONMENTS = {"textworld": textworld, "longhorizon": longhorizon}


def environment(c: ConfigDict, names: frozenset[str]) -> ConfigDict:
    """Applies the environment variant among ``names`` (at most one), before an algorithm's own settings."""
    chosen = sorted(names & set(ENVIRONMENTS))
    if len(chosen) > 1:
        raise ValueError(f"variants {' and '.join(chosen)} pick two environments; use one")
    for name in chosen:
        ENVIRONMENTS[name](c)
    return c


def variants(arg: str | None, file: str) -> frozenset[str]:
    """The comma-separated variants of a config argument ("textworld,smoke").

    Config files apply the environment (``textworld`` or ``longhorizon``,
    with ``environment``) first, then their algorithm's settings, then ``smoke``. Unknown names fail, listing the
    known ones.
    """
    names = frozenset(n for n in (arg or "").split(",") if n)
    unknown = sorted(names - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r} of {file}; known: {', '.join(VARIANTS)} "
                         f"(comma-separated, e.g. longhorizon,smoke)")
    return names


def smoke(c: ConfigDict) -> ConfigDict:
    """Shrinks a config in place to 2 quick steps on CPU with a tiny model."""
    c.total_steps = 2
    c.rollout.num_tasks = 2
    c.rollout.group_size = 2
    c.learner.minibatch_size = 4
    c.eval.num_tasks = 2
    c.checkpoint.every = 1
    if c.model.source == "scratch":
        c.model.hidden_size = 32
        c.model.intermediate_size = 64
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.model.num_kv_heads = 1
        c.model.head_dim = 16
    c.archer.critic.hidden_size = 32
    c.archer.critic.intermediate_size = 64
    c.archer.critic.num_layers = 1
    c.archer.critic.head_width = 16
    c.archer.critic_steps = 2
    c.archer.actor_steps = 1
    c.archer.actor_warmup = 1
    c.archer.buffer_episodes = 16
    c.archer.critic_minibatch_size = 4
    c.etpo.q.hidden_size = 32
    c.etpo.q.intermediate_size = 64
    c.etpo.q.num_layers = 1
    if c.env.name == "textworld":
        c.env.kwargs["max_steps"] = 2
        c.rollout.max_turns = 2
        c.model.bpe_vocab_size = 300
        c.model.tokenizer_corpus_tasks = 2
    return c
