"""The repository's local lm-eval task set (loadtest/evaluation/tasks/), as the tests expect it."""

# Each task: lm-eval's output type and its number of documents.
LOCAL_TASKS = {
    "yayi_docs_mc": ("multiple_choice", 42),
    "yayi_docs_ppl": ("loglikelihood_rolling", 21),
    "yayi_docs_copy": ("generate_until", 16),
}
