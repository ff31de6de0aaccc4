"""`cai-ray train ppo`: RL against the AI feedback. PPO's own loop (``loop.py``: policy,
value, reference and reward on Ray Train workers, vLLM or hf rollouts with weight sync) and
its critic-free variants GRPO and RLOO through TRL (``critic_free.py``); the reward sources
(``reward.py``), rollouts (``rollout.py``), Goodhart monitors (``monitors.py``) and the
config (``config.py``)."""
