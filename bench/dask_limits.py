"""What Beam 2.77's DaskRunner does differently from DirectRunner, each on a ten-element pipeline:
the reasons behind preprocessing's and the evaluation's graphs (README, "Other Beam runners").
Run by hand:

    python bench/dask_limits.py            # a LocalCluster: 2 worker processes, 1 thread each

Per runner it prints what each sink received. On DaskRunner, without a final Flatten only the
last transform's branch runs; with it: a tagged main output holds every output, a DoFn that
emits from `finish_bundle` and an unsharded WriteToText give empty files, `beam.BatchElements`
loses the batch each bundle ends with (it emits it from `finish_bundle`), a side input's
producer is evaluated again per reader, and sinks leave `beam-temp-*` folders behind.

Two more, behind the evaluation's graph (`components/evaluation/beam_pipeline.py`):

- `nested_side_input`: a ParDo whose side input is computed from the very ParDo (`Same`) that
  feeds its main input. Dask runs `Same` in the reader's task (a chain with one consumer is
  fused into it), then evaluates the side input by pickling its graph from that task; `Same`'s
  output receiver, a list the runner never clears, goes along with the ten values it already
  holds, so the side input sees each value twice (20, not 10). `nested_read_apart`: the same
  read through `beam_runners.read_apart` (a second, empty reader of the main input): 10.
- `chain_of_side_inputs`: `CHAIN_ROUNDS` (env, 3) rounds, each a ParDo over the data whose side
  input is the previous round's result, combined, then a step that reads the previous result
  again (the bias model's sweeps above EASE's item limit). Each reader evaluates its side
  input's whole producer again, the earlier rounds included, so the evaluations of the source
  double with every round: 2, 6, 14, 30 for 1..4 rounds on one partition (DirectRunner: 1), and
  (partitions + 1) ** rounds on more; ten sweeps do not finish (README).
"""

import glob
import os
import pathlib
import tempfile
import uuid

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from components.beam_runners import pipeline_options, read_apart, run_pipeline

SINKS = (
    "even_count",
    "finish_bundle",
    "unsharded",
    "side_input",
    "batch_elements",
    "nested_side_input",
    "nested_read_apart",
    "chain_of_side_inputs",
    "last",
)
CHAIN_ROUNDS = int(os.environ.get("CHAIN_ROUNDS", 3))


class _EmitInFinishBundle(beam.DoFn):
    def start_bundle(self):
        self._n = 0

    def process(self, element):
        self._n += 1

    def finish_bundle(self):
        yield WindowedValue(self._n, 0, [GlobalWindow()])


def _touch(x, directory):
    open(os.path.join(directory, uuid.uuid4().hex), "w").close()
    return x


def _len_of_side(_, side):
    return len(side)


def _round(x, previous):
    return x + max(previous)


def run(directory: str, runner: str, beam_args: list[str], final_flatten: bool) -> None:
    marks, chain_marks = os.path.join(directory, "marks"), os.path.join(directory, "chain_marks")
    os.makedirs(marks)
    os.makedirs(chain_marks)
    with run_pipeline(pipeline_options(runner, beam_args)) as p:  # no folder: temp dirs kept
        xs = p | "Create" >> beam.Create(list(range(10)))

        def sink(label, pcoll):
            path = os.path.join(directory, label)
            return pcoll | f"Write{label}" >> beam.io.WriteToText(path, num_shards=1)

        tagged = xs | "Tag" >> beam.Map(
            lambda x: beam.pvalue.TaggedOutput("odd", x) if x % 2 else x
        ).with_outputs("odd", main="even")
        written = [
            sink("even_count", tagged.even | beam.combiners.Count.Globally()),
            sink("finish_bundle", xs | beam.ParDo(_EmitInFinishBundle())),
            xs | beam.Map(str) | beam.io.WriteToText(os.path.join(directory, "unsharded")),
            sink(
                "side_input",
                p
                | "Three" >> beam.Create([1, 2, 3])
                | beam.Map(lambda _, s: len(s), beam.pvalue.AsList(xs | beam.Map(_touch, marks))),
            ),
            sink(
                "batch_elements",
                xs
                | beam.BatchElements(min_batch_size=1, max_batch_size=3)
                | "BatchedCount" >> beam.Map(len)
                | "BatchedSum" >> beam.CombineGlobally(sum),
            ),
        ]
        same = xs | "Same" >> beam.Map(lambda x: x)
        side = beam.pvalue.AsList(same | "SameCopy" >> beam.Map(lambda x: x))
        written.append(sink("nested_side_input", same | "Nested" >> beam.Map(_len_of_side, side)))
        apart = xs | "SameApart" >> beam.Map(lambda x: x)
        side_apart = beam.pvalue.AsList(apart | "SameApartCopy" >> beam.Map(lambda x: x))
        written.append(
            sink(
                "nested_read_apart", read_apart(apart, "Apart", beam.Map(_len_of_side, side_apart))
            )
        )
        counted = xs | "Counted" >> beam.Map(_touch, chain_marks)
        level = p | "Seed" >> beam.Create([0])
        for i in range(CHAIN_ROUNDS):  # as the bias model's sweeps: sums, then the next state
            previous = beam.pvalue.AsList(level)
            level = (
                counted
                | f"Round{i}" >> beam.Map(_round, previous)
                | f"Max{i}" >> beam.CombineGlobally(max)
                | f"Next{i}" >> beam.Map(_round, previous)
            )
        written += [
            sink("chain_of_side_inputs", level | "Last" >> beam.Map(lambda x: x)),
            sink("last", xs | "Str" >> beam.Map(str)),
        ]
        if final_flatten:
            _ = written | beam.Flatten()
    print(f"{runner}{' + final Flatten' if final_flatten else ''}:")
    for label in SINKS:
        found = [
            pathlib.Path(f).read_text().split() for f in sorted(glob.glob(f"{directory}/{label}*"))
        ]
        print(f"  {label:14} {found}")
    print(f"  side-input producer calls: {len(os.listdir(marks))} (10 per evaluation)")
    calls = len(os.listdir(chain_marks))
    print(f"  side-input chain of {CHAIN_ROUNDS} rounds, source calls: {calls} (10 per evaluation)")
    print(f"  beam-temp-* folders left: {len(glob.glob(f'{directory}/beam-temp-*'))}")


def main() -> None:
    from distributed import LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1) as cluster,
        tempfile.TemporaryDirectory() as tmp,
    ):
        address = [f"--dask_client_address={cluster.scheduler_address}"]
        run(os.path.join(tmp, "direct"), "DirectRunner", [], False)
        run(os.path.join(tmp, "dask"), "DaskRunner", address, False)
        run(os.path.join(tmp, "dask-flatten"), "DaskRunner", address, True)


if __name__ == "__main__":
    main()
