"""Bounds on every input a role takes over HTTP: the one place they are set.

A request over a limit is answered 413 (body size) or 400 (anything else), with a message that
names the limit, and the replica keeps serving. The values are generous for real jobs and small
enough that no single request can take a replica down (memory, an engine error).
"""

from __future__ import annotations

# Request bodies, counted before a route parses them (serving.RoleServer): JSON routes
# (/generate, /score, /checkpoint, /weights/*, vLLM's /v1/*). 64 MiB holds 4096 prompts of
# about 2000 tokens each as JSON, or 16384 completions of about 4 KB each.
MAX_BODY_BYTES = 64 << 20
# Routes that take a batch in its binary wire form (kubeforge.batch): the trainer's /train and
# /evaluate, the reference's /logprobs. 4 GiB holds MAX_TRAIN_ROWS rows of 16k tokens.
MAX_BATCH_BODY_BYTES = 4 << 30
BATCH_ROUTES = ("/train", "/evaluate", "/logprobs")

# /generate
MAX_PROMPTS = 4096  # prompts per request; the controller's pool splits a step's prompts across replicas
MAX_N = 16384  # samples per prompt: vLLM's own cap on SamplingParams.n
MAX_SAMPLES = 65536  # prompts x n per request: every sample's tokens are held until the answer is sent
MAX_STOP_TOKEN_IDS = 1024  # stop_token_ids per request
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # seeds are int64 (torch.Generator.manual_seed); prompt i uses seed + i
# max_tokens is bounded by the served model's length (vLLM's max_model_len), read from the engine.

# /train and /evaluate (trainer), /logprobs (reference): rows of one batch.
MAX_TRAIN_ROWS = 16384

# /score (reward role): completions scored per request, and the time budget a request may ask for
# (budget_seconds; the role's default is kubeforge.rewards.scoring.DEFAULT_BUDGET_S). An hour: a
# replica is shared by its job's requests, and a batch that needs more is better split.
MAX_SCORE_ITEMS = 16384
MAX_SCORE_BUDGET_S = 3600.0


def check_rows(rows: int) -> None:
    """BatchError (answered 400) for a batch of more than MAX_TRAIN_ROWS rows."""
    from kubeforge.batch import BatchError

    if rows > MAX_TRAIN_ROWS:
        raise BatchError(f"{rows} rows; at most {MAX_TRAIN_ROWS} per batch (MAX_TRAIN_ROWS)")


def max_body_bytes(path: str) -> int:
    """The body limit of the route at `path`."""
    return MAX_BATCH_BODY_BYTES if path in BATCH_ROUTES else MAX_BODY_BYTES
