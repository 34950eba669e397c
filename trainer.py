"""The training loop: compiled steps with the RNN state carried between batches (truncated BPTT), Adam with a
per-epoch learning-rate decay and global-norm clipping, full-pass validation, checkpoints, best/ and resume.

train(config) is what train.py calls. Everything whose value a resumed run needs (weights, optimizer,
step, epoch, position in the epoch, carried state, best score, loss since the last save) lives in
TensorFlow variables inside one tf.train.Checkpoint, so a resume continues exactly where the run stopped.
"""
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time

import tensorflow as tf
from tensorflow import keras

import checkpoints
import distribution as distribution_module
import precision as precision_module
import savedir
import train_samples
import unrolled
from evaluation import full_pass_loss, make_eval_chunk
from model import CharRNN
from runtime import EXIT_INTERRUPTED, warn
from settings import RESUMED_SETTINGS, ModelConfig, pick_seed
from utils import TextLoader, batches_in


class Progress(tf.Module):
    """The counters and carried state of a run, as checkpointed variables."""

    def __init__(self, num_states, batch_size, rnn_size, seq_length):
        super().__init__(name="progress")
        int_var = lambda value: tf.Variable(value, dtype=tf.int64, trainable=False)
        self.step, self.epoch, self.batch_in_epoch = int_var(0), int_var(0), int_var(0)
        self.batch_size, self.seq_length = int_var(batch_size), int_var(seq_length)
        self.best_loss = tf.Variable(math.inf, dtype=tf.float64, trainable=False)
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)  # training loss since the last save
        self.loss_count = int_var(0)
        # [num_states, batch, rnn_size]: every layer's h (and c) for every stream of the batch.
        self.state = tf.Variable(tf.zeros([num_states, batch_size, rnn_size]), trainable=False,
                                 shape=tf.TensorShape(None))

    def reset_state(self):
        self.state.assign(tf.zeros_like(self.state))


class Adam(keras.optimizers.Adam):
    """Keras' Adam for gradients that make_train_step has already summed over the replicas and clipped.

    In a replica, Keras' optimizer sums the gradients over the replicas itself, after any clipping it does: clipping
    would see one replica's gradient, not the batch's. The training step sums first and clips the sum, so the sum
    here is skipped (each replica then applies the same update to its copy of the weights, as Keras does).
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return grads_and_vars


def make_train_step(model, optimizer, progress, grad_clip, strategy=None, watch=None):
    """A compiled step: forward from the carried state, clipped Adam update, state and counters advanced, and the
    loss shown to `watch` (a DivergenceWatch, or None) inside the graph, so that no step waits for the host.

    Under a tf.distribute strategy of several replicas (see distribution.py), each replica takes its contiguous
    share of the batch's streams and of the carried state; the mean loss over the whole batch and its gradients
    are all-reduced before clipping, and the new state is gathered whole: the math, and the checkpoint, of one
    device. Every replica then updates its own copy of the weights alike; `progress` is not mirrored.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync

    def replica_step(inputs, targets):
        context = tf.distribute.get_replica_context()
        batch, steps = inputs.shape
        rows = batch // replicas
        first = context.replica_id_in_sync_group * rows
        mine = lambda tensor: tf.ensure_shape(tensor[first:first + rows], [rows, steps])
        state = tf.ensure_shape(progress.state.value(), [model.num_states, None, model.rnn_size])
        states = tuple(tf.unstack(state[:, first:first + rows], num=model.num_states))
        loss, grads, new_states = unrolled.loss_and_gradients(
            model, mine(inputs), mine(targets), states, rows=(first, batch) if replicas > 1 else None)
        state = tf.stack(new_states)
        if replicas > 1:  # the whole batch's mean loss: every replica's mean weighs 1 / replicas
            grads = [tf.convert_to_tensor(g) / replicas for g in grads]
            loss, grads = context.all_reduce(tf.distribute.ReduceOp.SUM, (loss / replicas, grads))
            state = context.all_gather(state, axis=1)
        grads, _ = tf.clip_by_global_norm(grads, grad_clip)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, state

    @tf.function
    def train_step(inputs, targets):
        # The progress counters are the run's, not the replicas': one copy, updated once per step.
        loss, state = (strategy.experimental_local_results(result)[0]
                       for result in strategy.run(replica_step, args=(inputs, targets)))
        progress.state.assign(state)
        progress.loss_sum.assign_add(tf.cast(loss, tf.float64))
        progress.loss_count.assign_add(1)
        progress.step.assign_add(1)
        progress.batch_in_epoch.assign_add(1)
        if watch is not None:
            watch.update(loss, progress.step)
        return loss
    return train_step


# How a collective op fails when another worker is gone: unreachable, timed out, or aborted by the health check.
WORKER_LOST = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
               tf.errors.AbortedError, tf.errors.InternalError)


# Divergence is more than NaN. A uniform guess over a vocabulary of V tokens scores ln V nats, and a fresh model
# starts near it; a learning rate far too high may leave the loss finite but astronomical (1e30 and more at
# --learning_rate 1e30 on some processors, NaN on others). A loss above twice ln V plus 10 nats has diverged: the
# model then gives the right token less than a V-th of a uniform guess's probability, and e^-10 of that; the 10 nats
# keep a small vocabulary (ln 2 is 0.69) from calling a bad patch divergence. Measured on tinyshakespeare
# (docs/save-dir.md): sane runs up to --learning_rate 0.1 never passed 5.3 nats in a step, against a limit of 18.3
# for its 65 characters.
DIVERGED_TIMES_LN_V = 2
DIVERGED_SLACK_NATS = 10
# One step's loss may spike at a high but sane learning rate: it counts once it has stayed above for this many steps.
# Averages (the training loss since the last checkpoint, the validation loss) count at once.
DIVERGED_STEPS = 20


def divergence_bar(vocab_size):
    """The loss, in nats, above which a run over `vocab_size` tokens has diverged (see DIVERGED_TIMES_LN_V)."""
    return DIVERGED_TIMES_LN_V * math.log(vocab_size) + DIVERGED_SLACK_NATS


class DivergenceWatch(tf.Module):
    """The divergence test of each step's training loss, run inside the compiled step: the count of consecutive
    steps above the bar, and the first step (with its loss) at which the loss was NaN or infinite or had stayed
    above the bar for DIVERGED_STEPS steps. The loop reads it only when it prints or saves: reading a value each
    step made every step wait for the host before the next batch was prepared (docs/performance.md, "The divergence
    check"). Not checkpointed: a resume counts afresh."""

    def __init__(self, bar):
        super().__init__(name="divergence_watch")
        self.bar = bar
        self.steps_above = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.tripped_step = tf.Variable(0, dtype=tf.int64, trainable=False)  # 0: not tripped
        self.tripped_loss = tf.Variable(0.0, dtype=tf.float32, trainable=False)

    def update(self, loss, step):
        """In the graph: count `loss` (a scalar, of step `step`) and note the first step that diverged."""
        loss = tf.cast(loss, tf.float32)
        above = tf.where(loss > self.bar, self.steps_above + 1, 0)
        self.steps_above.assign(above)
        tripped = tf.logical_and(tf.equal(self.tripped_step, 0), tf.logical_or(
            tf.logical_not(tf.math.is_finite(loss)), above >= DIVERGED_STEPS))
        self.tripped_step.assign(tf.where(tripped, step, self.tripped_step))
        self.tripped_loss.assign(tf.where(tripped, loss, self.tripped_loss))

    def tripped(self):
        """(step, loss) of the first diverged step, or None."""
        step = int(self.tripped_step)
        return (step, float(self.tripped_loss)) if step else None


def format_duration(seconds):
    """Seconds as h:mm:ss."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """One training run over a TextLoader into an open savedir.SaveDir; model, optimizer and counters are
    created in one place."""

    def __init__(self, config, loader, model_config, save_dir, distribution=None):
        self.config, self.loader, self.save_dir = config, loader, save_dir
        self.distribution = distribution or distribution_module.one_device()
        strategy = self.distribution.strategy
        with strategy.scope():  # the weights and the optimizer's slots mirrored on every replica
            self.model = CharRNN(model_config, precision=config.precision)
            self.model.build_weights()
            self.optimizer = Adam(config.learning_rate, weight_decay=config.weight_decay or None)
            self.optimizer.build(self.model.trainable_variables)  # Keras builds lazily; a restore needs the slots
        # After the training model, so that its weights and dropout seeds are those of a run without samples.
        self.samples = (train_samples.TrainingSamples(config, self.model, model_config, loader.vocab, loader.unk_token,
                                                      save_dir)
                        if config.sample_every != train_samples.SAMPLES_OFF and self.distribution.is_chief else None)
        self.progress = Progress(self.model.num_states, config.batch_size, config.rnn_size, config.seq_length)
        # The dropout layers' random state (Keras gives one only to a rate > 0), so that a resumed run draws the
        # masks the uninterrupted run would have drawn.
        self.dropout_rng = tf.Module(name="dropout_rng")
        self.dropout_rng.states = [layer.seed_generator.state for layer in self.model.dropouts
                                   if hasattr(layer, "seed_generator")]
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, progress=self.progress,
                                              dropout_rng=self.dropout_rng)
        save_dir.attach(self.checkpoint)
        self.loss_bar = divergence_bar(model_config.vocab_size)
        self.watch = DivergenceWatch(self.loss_bar)
        self.train_step = make_train_step(self.model, self.optimizer, self.progress, config.grad_clip, strategy,
                                          watch=self.watch)
        self.eval_chunk = make_eval_chunk(self.model)
        self.started = time.time()

    def resume(self, directory):
        """Restore the newest intact checkpoint of `directory`; a changed batch layout restarts the epoch (or starts
        the next one, when the checkpoint's was finished)."""
        weights = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, progress=self.progress)
        path, elapsed = self.save_dir.restore(weights, directory)
        self.started -= elapsed  # the clock goes on from the checkpoint's time
        # Apart, and only where saved: a run that had no dropout saved no dropout state.
        tf.train.Checkpoint(dropout_rng=self.dropout_rng).read(path).expect_partial()
        progress, config = self.progress, self.config
        if (int(progress.batch_size), int(progress.seq_length)) != (config.batch_size, config.seq_length):
            self.change_batch_layout()
        best_score = self.save_dir.best_score()
        if best_score is not None:  # best/ describes itself; the checkpoint may be older or newer than it
            progress.best_loss.assign(best_score)
        elif os.path.abspath(directory) != os.path.abspath(config.save_dir):
            progress.best_loss.assign(math.inf)
        print(f"resumed from {path}: step {int(progress.step)}, epoch {int(progress.epoch)}, batch "
              f"{int(progress.batch_in_epoch)}/{self.loader.num_batches}, learning rate "
              f"{self.learning_rate():.6g}, best score {float(progress.best_loss):.4f}")

    def change_batch_layout(self):
        """After a resume with another batch_size or seq_length: the epoch restarts from its first batch in the new
        layout (the old position means nothing there), or, when the checkpoint's epoch was finished, the next one
        starts."""
        progress, config = self.progress, self.config
        epoch = int(progress.epoch)
        old_batches = batches_in(len(self.loader.train_ids), int(progress.batch_size), int(progress.seq_length))
        if int(progress.batch_in_epoch) >= old_batches:  # saved after the epoch's last batch
            print(f"batch_size/seq_length changed: epoch {epoch} was finished; epoch {epoch + 1} starts from its "
                  f"first batch", file=sys.stderr)
            progress.epoch.assign_add(1)
        else:
            print(f"batch_size/seq_length changed: epoch {epoch} restarts from its first batch", file=sys.stderr)
        progress.batch_size.assign(config.batch_size)
        progress.seq_length.assign(config.seq_length)
        progress.batch_in_epoch.assign(0)
        progress.state.assign(tf.zeros([self.model.num_states, config.batch_size, config.rnn_size]))

    def learning_rate(self):
        return self.config.learning_rate * self.config.decay_rate ** int(self.progress.epoch)

    def total_steps(self):
        """Steps this run will have made when it ends (counting those before a resume)."""
        progress, num_batches = self.progress, self.loader.num_batches
        remaining = (self.config.num_epochs - int(progress.epoch)) * num_batches - int(progress.batch_in_epoch)
        total = int(progress.step) + max(remaining, 0)
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def run(self):
        """Train until num_epochs (or max_steps); returns the exit code (0, or 130 after Ctrl-C)."""
        total = self.total_steps()
        try:
            while int(self.progress.step) < total:
                self.run_epoch(total)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {self.save_on_interrupt()}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except WORKER_LOST as e:
            if self.distribution.name != "multi_worker":
                raise
            raise ConnectionError(self.distribution.lost_worker(e, self.config.save_dir)) from None
        if int(self.progress.loss_count) or not self.save_dir.latest_checkpoint:
            self.save()
        return 0

    def save_on_interrupt(self):
        """Write a checkpoint if a step was made since the last one; returns what happened, for one line."""
        if int(self.progress.step) == self.save_dir.saved_step:
            return "nothing new to save" + (f"; resume with --init_from {self.config.save_dir}"
                                           if self.save_dir.saved_step else " (no step was made)")
        path = self.save(validate=False)
        return f"checkpoint written to {path}; resume with --init_from {self.config.save_dir}"

    def run_epoch(self, total):
        """Run the rest of the current epoch (or up to `total` steps), printing, validating and saving."""
        progress, config, loader = self.progress, self.config, self.loader
        self.optimizer.learning_rate = self.learning_rate()
        if int(progress.batch_in_epoch) == 0:
            progress.reset_state()  # truncated BPTT: every epoch starts from a zero state
        step, epoch = int(progress.step), int(progress.epoch)
        tick, tick_step = time.perf_counter(), step
        for index in range(int(progress.batch_in_epoch), loader.num_batches):
            loss = self.train_step(*loader.batch(index))  # not read here: a read waits for the step
            step += 1
            if step % config.print_every == 0 or step == total:
                self.check_step_losses()
                seconds = (time.perf_counter() - tick) / (step - tick_step)
                self.report(step, total, epoch, float(loss), seconds)
                tick, tick_step = time.perf_counter(), step
            saved = step % config.save_every == 0 or step == total
            if saved:
                self.save()
            if self.samples and self.samples.due(step, saved):
                self.samples.write(step)
            if step >= total:
                return
        progress.epoch.assign_add(1)
        progress.batch_in_epoch.assign(0)

    def report(self, step, total, epoch, loss, seconds):
        """Print the original's progress line plus an ETA, and log the training loss."""
        tokens_per_s = self.config.batch_size * self.config.seq_length / seconds
        print(f"{step}/{total} (epoch {epoch}), train_loss = {loss:.4f}, time/batch = {seconds:.3f}, "
              f"ETA {format_duration((total - step) * seconds)}", flush=True)
        self.save_dir.metrics.write(step, epoch=epoch, train_loss=loss, learning_rate=self.learning_rate(),
                           tokens_per_s=tokens_per_s, elapsed_s=round(time.time() - self.started, 1))

    def save(self, validate=True):
        """Write a checkpoint; when `validate`, also the full-pass validation loss and best/ if it improved."""
        self.check_step_losses()
        progress = self.progress
        count = int(progress.loss_count)
        train_loss = float(progress.loss_sum) / count if count else math.nan
        if count:
            self.check_loss("the training loss", train_loss, f"before step {int(progress.step)}")
        if not checkpoints.weights_finite(self.model):
            self.diverged(f"the weights became NaN or infinite by step {int(progress.step)}")
        step = int(progress.step)
        val_loss = None
        if validate and len(self.loader.val_ids):  # none when the text holds a batch but not also the tail
            val_loss, _ = full_pass_loss(self.model, self.loader.val_ids, self.eval_chunk)
            self.check_loss("the validation loss", val_loss, f"at step {step}")
            print(f"{step}/{self.total_steps()} (epoch {int(progress.epoch)}), val_loss = {val_loss:.4f}",
                  flush=True)
            self.save_dir.metrics.write(step, epoch=int(progress.epoch), val_loss=val_loss)
        # Best: lowest validation loss; without a validation split, lowest mean training loss since last save.
        score = val_loss if val_loss is not None else (train_loss if count else None)
        improved = validate and score is not None and score < float(progress.best_loss)
        if improved:
            progress.best_loss.assign(score)
        progress.loss_sum.assign(0.0)
        progress.loss_count.assign(0)
        return self.save_dir.save(step, self.model_info(step, score, val_loss, train_loss) if improved else None)

    def check_step_losses(self):
        """Stop when a step's training loss was NaN or infinite, or stayed above loss_bar for DIVERGED_STEPS steps
        in a row, since the run started (the watch in the compiled step keeps the count)."""
        tripped = self.watch.tripped()
        if tripped is None:
            return
        step, loss = tripped
        if not math.isfinite(loss):
            self.diverged(f"the training loss became {loss} at step {step}")
        self.diverged(f"the training loss stayed above {self.describe_bar()} for {DIVERGED_STEPS} steps "
                      f"({loss:.6g} at step {step})")

    def check_loss(self, name, loss, when):
        """Stop when a loss averaged over many tokens (the training loss since the last checkpoint, the validation
        loss) is NaN, infinite or above loss_bar."""
        if not math.isfinite(loss):
            self.diverged(f"{name} became {loss} {when}")
        if loss > self.loss_bar:
            self.diverged(f"{name} became {loss:.6g} {when}, above {self.describe_bar()}")

    def describe_bar(self):
        """loss_bar and where it comes from, for a message."""
        uniform = math.log(self.model.vocab_size)
        return (f"{self.loss_bar:.1f} nats ({DIVERGED_TIMES_LN_V} x the {uniform:.2f} of a uniform guess over "
                f"{self.model.vocab_size} tokens, plus {DIVERGED_SLACK_NATS})")

    def diverged(self, what):
        """Stop training: raise FloatingPointError saying what diverged and what is left to resume from."""
        kept = self.save_dir.latest_checkpoint
        left = (f"the last good checkpoint, {kept}, is kept" if kept else
                "no checkpoint was written")
        raise FloatingPointError(f"{what}; training stopped and {left}; try a lower --learning_rate")

    def model_info(self, step, score, val_loss, train_loss):
        return {"score": float(score), "score_is": "val_loss" if val_loss is not None else "mean train_loss",
                "val_loss": None if val_loss is None else float(val_loss),
                "train_loss": float(train_loss), "step": step, "total_steps": self.total_steps(),
                "epoch": int(self.progress.epoch), "time_s": round(time.time() - self.started, 1),
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def with_resume_settings(config):
    """For a resume: the settings left None (not given) taken from the checkpoint's config.yaml, and
    --word2vec_embedding dropped (the weights come from the checkpoint). Other runs: `config` as it is."""
    if not config.init_from:
        return config
    if config.word2vec_embedding:
        warn("--word2vec_embedding ignored: the weights come from --init_from")
        config = dataclasses.replace(config, word2vec_embedding=None)
    missing = [name for name in RESUMED_SETTINGS if getattr(config, name) is None]
    if not missing:
        return config
    saved = savedir.read_saved(config.init_from).train_config  # with the defaults of settings added since
    taken = {name: getattr(saved, name) for name in missing}
    print("from the checkpoint: " + ", ".join(f"{name} {value}" for name, value in taken.items()))
    return dataclasses.replace(config, **taken)


def choose_precision(config):
    """The precision this run trains in (config.yaml records it), after a line saying why when auto chose it."""
    precision, why = precision_module.choose(config.precision, config.rnn_size, on_gpu=unrolled.has_gpu())
    if config.precision == "auto":
        print(f"precision {precision} ({why})")
    return precision


def load_text(config):
    """The TextLoader of config's data, after one line saying how many tokens it holds and how they are used."""
    loader = TextLoader.from_config(config)
    print(f"{len(loader.ids):,} tokens, vocabulary of {loader.vocab_size}: {len(loader.train_ids):,} for training "
          f"({loader.num_batches} batches of {config.batch_size}x{config.seq_length}), "
          f"{len(loader.val_ids):,} for validation")
    return loader


def network(config, loader):
    """The ModelConfig this run trains, and the word2vec rows to start its embedding from (or None).

    The embedding is rnn_size wide, as wide as the vectors when it starts from word2vec, and as wide as the
    checkpoint's when resuming.
    """
    embedding_size, vectors = config.rnn_size, None
    if config.init_from:
        embedding_size = savedir.read_saved(config.init_from).model_config.embedding_size
    elif config.word2vec_embedding:
        import embeddings  # gensim is slow to import; only word2vec users pay for it
        vectors = embeddings.embedding_matrix(config.word2vec_embedding, loader.vocab, config.seed)
        embedding_size = vectors.shape[1]
    return ModelConfig(loader.vocab_size, config.model, config.rnn_size, config.num_layers, embedding_size,
                       config.dropout), vectors


def train(config):
    """Train as `config` (a settings.TrainConfig) says; returns the exit code. Raises ValueError or
    FileNotFoundError on user errors, before anything is written where it can.

    With init_from, settings of RESUMED_SETTINGS that are None come from the checkpoint.
    """
    distribution = distribution_module.choose(  # before TensorFlow's devices
        config.strategy, config.replicas, cluster_timeout=config.cluster_timeout)
    if config.batch_size % distribution.replicas:
        raise ValueError(f"batch_size {config.batch_size} does not divide among {distribution.replicas} replicas: "
                         f"give a batch_size that is a multiple of {distribution.replicas}")
    config = with_resume_settings(config)
    config = dataclasses.replace(config, seed=pick_seed() if config.seed is None else config.seed,
                                 precision=choose_precision(config))
    keras.utils.set_random_seed(config.seed)
    loader = load_text(config)
    model_config, vectors = network(config, loader)
    settings = savedir.saved_settings(config, model_config, loader.unk_token)
    if config.init_from:
        savedir.check_resumable(config.init_from, settings, loader.vocab)
    resuming_here = bool(config.init_from) and os.path.abspath(config.init_from) == os.path.abspath(config.save_dir)
    if distribution.name != "one":
        print(distribution.describe())
    # Only the chief writes the save dir; every other worker saves too (as tf.distribute asks of every worker),
    # into a temporary dir that is removed when it stops.
    path = config.save_dir if distribution.is_chief else tempfile.mkdtemp(prefix="char-rnn-worker-")
    try:
        with savedir.SaveDir(path, config.log_dir if distribution.is_chief else None) as save_dir:
            save_dir.prepare(settings, loader.vocab, loader.unk_token, resuming_here and distribution.is_chief)
            trainer = Trainer(config, loader, model_config, save_dir, distribution)
            if config.init_from:
                trainer.resume(config.init_from)
            elif vectors is not None:
                trainer.model.embedding.embeddings.assign(vectors)
            return trainer.run()
    finally:
        if not distribution.is_chief:
            shutil.rmtree(path, ignore_errors=True)
