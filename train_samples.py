"""Samples while training (train.py --sample_every): a short text at fixed steps, printed, appended to the save
dir's samples.txt and written to TensorBoard, so that a user sees what the model writes as it learns.

Each sample starts from the empty prime (as if at the start of a line) with the same seed (--sample_seed) at every
step, so that the samples of two steps differ only by what the model learned between them. It is sample.py's
sampler (sampler.Sampler) on a float32 copy of the training weights: the training weights, its optimizer and its
random state are never touched, so a run with samples trains exactly as one without, and a resumed run writes the
samples the uninterrupted run wrote. The text is the one `sample.py --prime "" -n LENGTH --temperature T --seed S`
prints from that step's checkpoint: the same XLA-compiled generator. Without XLA (as the export runs) the first
sampling would start sooner (2.9 s against 8.4 s to compile, at 3 x 128 on 2 busy cores) but each would take 0.36 s
against 0.07 s, about the same over a default run's 23 samplings, and TensorFlow logs a oneDNN notice on stderr
when that graph first runs.
"""
import dataclasses

import savedir
from model import CharRNN
from sampler import Sampler
from settings import SampleSettings, parse_temperatures

SAMPLES_OFF = -1  # --sample_every: no samples
WITH_CHECKPOINTS = 0  # --sample_every: a sample at each checkpoint (every --save_every steps, and at the last)


class TrainingSamples:
    """The samples of one training run: `due(step, saved)` says whether a step gets them, `write(step)` makes
    them from the training model's current weights."""

    def __init__(self, config, model, model_config, vocab, unk_token, save_dir):
        """config: the run's TrainConfig; model: the training CharRNN; save_dir: the open savedir.SaveDir."""
        self.config, self.model, self.save_dir = config, model, save_dir
        self.temperatures = parse_temperatures(config.sample_temperatures)
        # No dropout: a dropout layer would take a seed from the training's random state (nor does sampling drop).
        self.copy = CharRNN(dataclasses.replace(model_config, dropout=0.0), random_init=False)
        self.copy.build_weights()
        loaded = savedir.Loaded(config, model_config, vocab, unk_token, self.copy, path=None)
        self.sampler = Sampler(loaded)

    def due(self, step, saved):
        """Whether `step` gets samples: every --sample_every steps, or with each checkpoint (`saved`)."""
        every = self.config.sample_every
        if every == SAMPLES_OFF:
            return False
        return saved if every == WITH_CHECKPOINTS else step % every == 0

    def write(self, step):
        """Sample at each temperature from the training weights of now: print, append to samples.txt, log."""
        for source, target in zip(self.model.trainable_variables, self.copy.trainable_variables, strict=True):
            target.assign(source.value)
        self.sampler.generator.weights_changed()
        seed = self.config.sample_seed
        for temperature in self.temperatures:
            text = self.sampler.run(SampleSettings(prime="", n=self.config.sample_length, temperature=temperature,
                                                   seed=seed))
            print(f"sample at step {step}, temperature {temperature:g}:\n{text}", flush=True)
            self.save_dir.write_sample(step, temperature, seed, text)
