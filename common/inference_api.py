"""What the inference service and its clients agree on beyond ``protos/privtune/v1/inference.proto``.

A gRPC status code alone is ambiguous: gRPC itself answers RESOURCE_EXHAUSTED for an oversized
message and UNAVAILABLE for a connection it cannot make. The service marks its own answers with
trailing metadata ``ERROR_KIND`` so that a client never calls a size refusal a budget refusal, nor
a restarting replica an unreachable host.
"""

ERROR_KIND = "privtune-error"
BUDGET_EXHAUSTED = "budget-exhausted"  # with RESOURCE_EXHAUSTED: the privacy budget is spent
RESTARTING = "restarting"  # with UNAVAILABLE: a replica or the budget keeper is restarting; retry

MAX_PROMPT_TEXT_BYTES = 256 * 1024
MAX_PROMPT_TOKENS = 65536
