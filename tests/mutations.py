"""Single-line breaks the test suite must catch: each is applied to a copy of the repository and the tests that
guard that promise are run there; a break that passes them is reported as survived.

usage: python tests/mutations.py                 # every break (a few minutes per break on 2 cores)
       python tests/mutations.py --only top_k     # the breaks whose name contains "top_k"
       python tests/mutations.py --list

Each break names the file, the exact text it replaces (found exactly once), the replacement, and the tests to
run (pytest arguments relative to the repository). Not collected by pytest: CI runs the tests themselves.
"""
import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST_TESTS_FAILED = 1  # pytest's exit code when tests ran and some failed (2-5: interrupted, errors, none run)


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple


MUTATIONS = [
    # The ten breaks of the tests issue.
    Mutation("state_not_carried", "trainer.py", "progress.state.assign(state)",
             "progress.state.assign(tf.zeros_like(state))", ("tests/test_train_loop.py", "-k", "state")),
    Mutation("no_lr_decay", "trainer.py",
             "return self.config.learning_rate * self.config.decay_rate ** int(self.progress.epoch)",
             "return self.config.learning_rate", ("tests/test_train_loop.py", "-k", "learning_rate")),
    Mutation("dropout_off_in_model", "unrolled.py", "outputs.append(dropout(model.dropouts[i], h, training, rows))",
             "outputs.append(dropout(model.dropouts[i], h, False, rows))", ("tests/test_model.py", "-k", "drops")),
    Mutation("top_k_is_one", "sampler.py", "k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)",
             "k = tf.where(top_k > 0, tf.ones_like(top_k), vocab)",
             ("tests/test_sample.py", "-k", "top_k")),
    Mutation("seed_without_block_position", "sampler.py",
             "positions = positions[:, tf.newaxis] + tf.range(steps, dtype=tf.int64)",
             "positions = 0 * positions[:, tf.newaxis] + tf.range(steps, dtype=tf.int64)",
             ("tests/test_sample.py", "-k", "block")),
    Mutation("top_k_unbounded", "settings.py", '"(0 keeps every token)", 0, MAX_N, dtype="int32"),',
             '"(0 keeps every token)", 0, 2 ** 62, dtype="int32"),',
             ("tests/test_sample.py", "tests/test_server.py", "-k", "limits or bad_arguments")),
    Mutation("prime_limit_off_by_one", "request_parsing.py", "if len(prime) > limits.max_prime:",
             "if len(prime) > limits.max_prime + 1:", ("tests/test_server.py", "-k", "limits")),
    Mutation("padding_in_eval_loss", "evaluation.py", "* tf.cast(weights, tf.float64)), new_states",
             "), new_states", ("tests/test_evaluate.py", "-k", "padding")),
    Mutation("best_delete_then_rename", "savedir.py", "        os.rename(best, old)\n",
             "        shutil.rmtree(best)\n", ("tests/test_savedir.py",)),
    Mutation("empty_prime_from_space", "sampler.py", "EMPTY_PRIME_START = NEWLINE", 'EMPTY_PRIME_START = " "',
             ("tests/test_sample.py", "-k", "empty_prime")),
    # Data, evaluation and word level.
    Mutation("min_count_strict", "utils.py", "if count >= min_count]", "if count > min_count]",
             ("tests/test_utils.py",)),
    Mutation("max_vocab_one_short", "utils.py", "kept = kept[:max_vocab]", "kept = kept[:max_vocab - 1]",
             ("tests/test_utils.py",)),
    Mutation("uint16_boundary", "utils.py", "vocab_size <= np.iinfo(np.uint16).max + 1",
             "vocab_size <= np.iinfo(np.uint16).max", ("tests/test_utils.py",)),
    Mutation("cache_key_without_settings", "utils.py",
             'settings = {"version": CACHE_VERSION, **dataclasses.asdict(tokenization)}',
             'settings = {"version": CACHE_VERSION, **dataclasses.asdict(tokenization), "min_count": 1}',
             ("tests/test_utils.py",)),
    Mutation("validation_tail_rounded", "utils.py", "num_val = int(len(self.ids) * val_frac)",
             "num_val = round(len(self.ids) * val_frac)", ("tests/test_utils.py",)),
    Mutation("batches_reach_past_targets", "utils.py",
             "return (num_tokens - 1) // (batch_size * seq_length)",
             "return num_tokens // (batch_size * seq_length)", ("tests/test_utils.py",)),
    Mutation("validation_kept_without_a_batch", "utils.py", "            num_val = 0\n", "\n",
             ("tests/test_utils.py", "-k", "validation_tail_trains")),
    Mutation("blank_text_cached_before_refused", "utils.py",
             "    check_trainable(input_path, vocab, tokenization.word_level)  # before anything is written\n", "",
             ("tests/test_faults.py", "-k", "empty_or_blank")),
    Mutation("capped_words_by_largest", "utils.py", "heapq.nsmallest(limit, items", "heapq.nlargest(limit, items",
             ("tests/test_utils.py",)),
    Mutation("ties_by_appearance", "utils.py", "return -count, token", "return -count, 0", ("tests/test_utils.py",)),
    Mutation("evaluate_split_train_ignored", "evaluate.py",
             'ids = loader.val_ids if split == "val" else loader.train_ids', "ids = loader.val_ids",
             ("tests/test_evaluate.py", "-k", "split")),
    Mutation("glove_header_expected", "embeddings.py", '"no_header": True}', "}",
             ("tests/test_words.py", "-k", "every_format")),
    # Faults.
    Mutation("nan_checkpoint_saved", "trainer.py", "        if not checkpoints.weights_finite(self.model):\n",
             "        if False:\n", ("tests/test_faults.py", "-k", "nan_after_a_finite_loss")),
    Mutation("nan_weights_loaded", "savedir.py", "    checkpoints.check_finite(model, path)\n    return Loaded",
             "    return Loaded",
             ("tests/test_faults.py", "-k", "nan_weights")),
    Mutation("ctrl_c_saves_random_weights", "trainer.py", "if int(self.progress.step) == self.save_dir.saved_step:",
             "if False:", ("tests/test_train_loop.py", "-k", "before_any_step")),
    Mutation("crlf_kept", "utils.py", "return chunks if keep_crlf else _crlf_to_lf(chunks)", "return chunks",
             ("tests/test_faults.py", "-k", "crlf")),
    Mutation("temp_files_private", "files.py", "    os.fchmod(fd, NEW_FILE_MODE & ~current_umask())\n", "",
             ("tests/test_faults.py", "-k", "umask")),
    Mutation("metrics_rows_replayed", "savedir.py", "kept = [row for row in rows if int(row[\"step\"]) <= step]",
             "kept = rows", ("tests/test_faults.py", "-k", "metrics")),
    # More of the training loop, the save dir and the server.
    Mutation("grad_clip_not_passed", "trainer.py",
             "make_train_step(self.model, self.optimizer, self.progress, config.grad_clip, strategy,",
             "make_train_step(self.model, self.optimizer, self.progress, 5.0, strategy,",
             ("tests/test_train_loop.py", "-k", "clipped")),
    Mutation("epoch_not_advanced", "trainer.py", "progress.epoch.assign_add(1)\n        progress.batch_in_epoch.assign(0)",
             "progress.epoch.assign_add(0)\n        progress.batch_in_epoch.assign(0)",
             ("tests/test_train_loop.py", "-k", "state_is_carried")),
    Mutation("six_checkpoints_kept", "checkpoints.py", "MAX_TO_KEEP = 5", "MAX_TO_KEEP = 6",
             ("tests/test_train.py", "-k", "last_5")),
    Mutation("log_dir_ignored", "savedir.py", "self.log_dir = log_dir or os.path.join(path, LOG_DIR)",
             "self.log_dir = os.path.join(path, LOG_DIR)", ("tests/test_train.py", "-k", "tensorboard")),
    Mutation("server_temperature_flag_ignored", "request_parsing.py",
             'default = limits.temperature if setting.name == "temperature" else setting.served_default',
             'default = setting.served_default',
             ("tests/test_server.py", "-k", "flags_set")),
    Mutation("x_seed_header_wrong", "sample_server.py", 'cherrypy.response.headers["X-Seed"] = str(request.seed)',
             'cherrypy.response.headers["X-Seed"] = "0"', ("tests/test_server.py", "-k", "names_the_seed")),
    # Training on several replicas (tests/test_distributed.py).
    Mutation("replicas_read_the_same_streams", "trainer.py", "first = context.replica_id_in_sync_group * rows",
             "first = 0 * rows", ("tests/test_distributed.py", "-k", "train_and_resume and 0.0")),
    Mutation("dropout_mask_of_replica_0_everywhere", "unrolled.py", "return x * mask[first:first + x.shape[0]]",
             "return x * mask[:x.shape[0]]", ("tests/test_distributed.py", "-k", "train_and_resume and 0.25")),
    Mutation("clipped_in_each_replica", "trainer.py", "grads = [tf.convert_to_tensor(g) / replicas for g in grads]",
             "grads = tf.clip_by_global_norm([tf.convert_to_tensor(g) / replicas for g in grads], grad_clip)[0]",
             ("tests/test_distributed.py", "-k", "train_and_resume and 0.0")),
    Mutation("no_rendezvous", "distribution.py", 'rendezvous(cluster, (task["type"], task["index"]), cluster_timeout)',
             "pass", ("tests/test_distributed.py", "-k", "port_is_taken or never_start or sigint_or_sigterm")),
    Mutation("sigterm_left_to_tensorflow", "distribution.py",
             "signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)", "pass",
             ("tests/test_distributed.py", "-k", "lost_worker")),
    # sample.py for daily use.
    Mutation("top_p_keeps_one_more", "sampler.py", "kept = tf.reduce_sum(tf.cast(likelier < top_p[:, tf.newaxis], tf.int32), axis=-1)",
             "kept = tf.minimum(tf.reduce_sum(tf.cast(likelier <= top_p[:, tf.newaxis], tf.int32), axis=-1) + 1, "
             "tf.shape(logits)[-1])", ("tests/test_sample.py", "-k", "top_p")),
    Mutation("stop_string_printed", "sample_text.py", "final, self.pending = self.pending[:min(found)], \"\"",
             "final, self.pending = self.pending, \"\"", ("tests/test_sample_features.py", "-k", "stop")),
    Mutation("stop_string_not_held_back", "sample_text.py",
             "self.held_back = max(map(len, stops), default=1) - 1", "self.held_back = 0",
             ("tests/test_sample_features.py", "-k", "stop_string_cuts")),
    Mutation("samples_share_a_seed", "sampler.py",
             "np.array([(seed + row) % (MAX_SEED + 1) for row in range(rows)], np.int64)",
             "np.array([seed for row in range(rows)], np.int64)",
             ("tests/test_sample_features.py", "-k", "several_samples")),
    # Continuous batching and the JSON API (issue 15).
    Mutation("rows_share_the_first_rows_settings", "sampler.py",
             "np.array([getattr(sample, setting.name) for sample in samples], setting.dtype)",
             "np.array([getattr(samples[0], setting.name) for sample in samples], setting.dtype)",
             ("tests/test_batching.py",)),
    Mutation("rows_restart_their_draws_each_block", "batching.py",
             "np.array([row.position for row in padded], np.int32)", "np.zeros(len(padded), np.int32)",
             ("tests/test_batching.py",)),
    Mutation("a_pool_sends_every_request_to_the_first_batcher", "batching.py",
             "batcher = max(self.batchers, key=lambda batcher: batcher.max_batch + batcher.max_waiting - batcher.load)",
             "batcher = self.batchers[0]", ("tests/test_batching.py", "-k", "pool")),
    Mutation("a_lone_clients_request_waits_for_others", "batching.py",
             "deadline = time.monotonic() + (0 if self._lone else self.max_wait_s)",
             "deadline = time.monotonic() + self.max_wait_s", ("tests/test_batching.py", "-k", "lone")),
    Mutation("the_last_block_runs_past_n", "sampler.py", "yield position, min(steps, n - position)",
             "yield position, steps", ("tests/test_sample.py", "-k", "no_step_past_n")),
    Mutation("blocks_grow_past_their_room", "sampler.py", "steps = min(2 * steps, LONGEST_BLOCK)",
             "steps = 2 * steps", ("tests/test_long_samples.py", "-k", "every_mode")),
    Mutation("long_blocks_draw_again_from_the_start", "sampler.py", "np.full(rows, position, np.int32), *carry",
             "np.full(rows, position % LONGEST_BLOCK, np.int32), *carry", ("tests/test_long_samples.py", "-k", "several")),
    Mutation("blocks_run_to_the_longest_row", "batching.py",
             "return min(GENERATE_BLOCK, max(remaining), max(MIN_BLOCK_STEPS, min(remaining)))",
             "return min(GENERATE_BLOCK, max(remaining))", ("tests/test_batching.py", "-k", "first_row")),
    Mutation("kept_primes_ignore_the_prime", "sampler.py", "key = np.asarray(prime, np.int32).tobytes()",
             "key = b''", ("tests/test_sample.py", "-k", "prime_fed_again")),
    Mutation("packed_states_come_back_reversed", "sampler.py",
             "return tokens, previous, logits, tf.concat(states, axis=1)",
             "return tokens, previous, logits, tf.concat(states[::-1], axis=1)", ("tests/test_batching.py",)),
    Mutation("json_true_is_an_integer", "request_parsing.py",
             "if isinstance(value, bool) or not isinstance(value, kind):", "if not isinstance(value, kind):",
             ("tests/test_server.py", "-k", "post_generate_refuses")),
    # Sampling's step with trained biases, stop strings in one block, word spacing around line breaks.
    Mutation("gru_step_recurrent_bias_outside_reset_gate", "model.py",
             "x_bias, h_bias = unrolled.split_bias(self.cell_type, cell.bias.value)",
             "x_bias, h_bias = (tf.reduce_sum(cell.bias.value, 0), None) if self.cell_type == \"gru\" "
             "else (cell.bias.value, None)", ("tests/test_model.py", "-k", "step_computes")),
    Mutation("stop_string_latest_wins", "sample_text.py", "final, self.pending = self.pending[:min(found)], \"\"",
             "final, self.pending = self.pending[:max(found)], \"\"", ("tests/test_sample_features.py", "-k", "stop")),
    Mutation("word_space_before_line_break", "utils.py", "if token != NEWLINE and pieces and pieces[-1] != NEWLINE:",
             "if pieces and pieces[-1] != NEWLINE:", ("tests/test_words.py", "-k", "line_break")),
    Mutation("word_space_after_line_break", "utils.py", "if token != NEWLINE and pieces and pieces[-1] != NEWLINE:",
             "if token != NEWLINE and pieces:", ("tests/test_words.py", "-k", "line_break")),
    # Penalties and log-probabilities (issue 27).
    Mutation("presence_penalty_raises", "sampler.py",
             "return logits - counted * frequency_penalty[:, tf.newaxis] - present * presence_penalty[:, tf.newaxis]",
             "return logits - counted * frequency_penalty[:, tf.newaxis] + present * presence_penalty[:, tf.newaxis]",
             ("tests/test_penalties_logprobs.py", "-k", "formula")),
    Mutation("generated_tokens_not_counted", "sampler.py",
             "counted = tuple(counts + tf.one_hot(token, self.model.vocab_size, dtype=tf.int32) for counts in counted)",
             "counted = tuple(counts + 0 * tf.one_hot(token, self.model.vocab_size, dtype=tf.int32) for counts in counted)",
             ("tests/test_penalties_logprobs.py", "-k", "frequency_penalty or prime")),
    Mutation("prime_space_before_line_break", "sampler.py",
             "and not prime[-1].isspace() and text[0] != NEWLINE:", "and not prime[-1].isspace():",
             ("tests/test_words.py", "-k", "line_break")),
]


def copy_repo(destination):
    """Copy the files git knows (tracked, and new ones not ignored) into `destination`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = os.path.join(REPO, relative)
        if os.path.isfile(source):
            target = os.path.join(destination, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)


def apply(mutation, root):
    """Replace the mutation's text in its file under `root`; the text must occur exactly once."""
    path = os.path.join(root, mutation.file)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    found = source.count(mutation.old)
    if found != 1:
        raise ValueError(f"{mutation.name}: the text to replace occurs {found} times in {mutation.file}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source.replace(mutation.old, mutation.new))


def run(mutation):
    """Apply one break to a fresh copy and run its tests; returns (caught, seconds, last line of pytest).

    Caught means that tests ran and at least one failed; an error of the run itself is a RuntimeError.
    """
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as root:
        copy_repo(root)
        apply(mutation, root)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *mutation.tests], cwd=root, capture_output=True, text=True)
        lines = (result.stdout.strip().splitlines() or ["(no output)"])
        if result.returncode not in (0, PYTEST_TESTS_FAILED):  # a run that broke is no catch
            raise RuntimeError(f"{mutation.name}: pytest exited {result.returncode}: {lines[-1]}")
        return result.returncode == PYTEST_TESTS_FAILED, time.monotonic() - started, lines[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Apply single-line breaks to copies of the repository and check "
                                                 "that the tests catch each.")
    parser.add_argument("--only", default="", help="run only the breaks whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if not chosen:
        print(f"error: no break named like {args.only!r}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            with open(os.path.join(REPO, m.file), encoding="utf-8") as f:
                found = f.read().count(m.old)
            print(f"{m.name}: {m.file}: {m.old.strip()!r} -> {m.new.strip()!r}; tests {' '.join(m.tests)}"
                  + ("" if found == 1 else f"  [the text occurs {found} times: fix this break]"))
        return 0
    survived = []  # and the breaks whose run could not tell
    for number, mutation in enumerate(chosen, 1):
        try:
            caught, seconds, summary = run(mutation)
            outcome = f"{'caught' if caught else 'SURVIVED'} ({seconds:.0f} s; {summary})"
        except (ValueError, RuntimeError) as error:
            caught, outcome = False, f"ERROR ({error})"
        print(f"[{number}/{len(chosen)}] {mutation.name}: {outcome}", flush=True)
        if not caught:
            survived.append(mutation.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} breaks caught"
          + (f"; not caught: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
