"""What the run measures: perplexity, lm-eval tasks, speed."""
from typing import List, Optional

from .base import Settings, at_least, name_list, rule, setting, stage


@stage("evaluation")
class EvalSettings(Settings):
    eval: str = setting(
        "wikitext2", help="evaluation text: wikitext2 (hub, or the local file of --data-file / "
                          "$PROBPRUNE_WIKITEXT2), wiki-summaries (held-out part), or a local "
                          ".txt/.raw/.jsonl/.json file or folder")
    eval_file: Optional[str] = setting(
        None, flag="--data-file",
        help="local copy of the wikitext2 evaluation text, e.g. wikitext-2-raw/wiki.test.raw")
    max_eval_windows: Optional[int] = setting(
        None, flag="--max-windows", help="evaluate only the first N windows (a quick look)",
        check=at_least(1))
    window_stride: int = setting(
        1, help="evaluate every N-th window (16 with --seqlen 128: the every-16th-window "
                "WikiText-2 protocol of FLAP / LLM-Pruner comparisons)", check=at_least(1))
    eval_batch_size: int = setting(8, help="windows per forward during evaluation",
                                   check=at_least(1))
    eval_tasks: List[str] = setting(
        [], parse=name_list,
        check=rule(lambda v: len(set(v)) == len(v), "must name each task once"),
        help="lm-evaluation-harness tasks, comma-separated, e.g. piqa,hellaswag,arc_easy (needs "
             "pip install 'probprune[lmeval]'): prune scores the exported model into "
             "report.json's zero_shot; eval runs them instead of the perplexity")
    tasks_path: Optional[str] = setting(
        None, help="a folder of your own lm-eval task YAML files, found besides the built-in tasks")
    task_limit: Optional[int] = setting(
        None, check=at_least(1), help="score only the first N documents of each task (a quick "
                                      "look; lm-eval's --limit)")
    speed_tokens: int = setting(
        32, help="decode tokens timed on the dense model and on the export for report.json's "
                "speed (after a prefill of one --seqlen window); 0: no timing",
        check=rule(lambda v: v == 0 or v >= 2, "must be 0 (no timing) or at least 2"))
    speed_rounds: int = setting(
        3, check=at_least(1),
        help="measure every model this many times, the models in turn (each in a fresh "
             "process), and show the medians and their spread: on a shared machine, background "
             "load then falls on all alike")
