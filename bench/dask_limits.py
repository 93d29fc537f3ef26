"""What Beam 2.77's DaskRunner does differently from DirectRunner, each on a ten-element pipeline:
the reasons behind preprocessing's graph (README, "Other Beam runners"). Run by hand:

    python bench/dask_limits.py            # a LocalCluster: 2 worker processes, 1 thread each

Per runner it prints what each sink received. On DaskRunner, without a final Flatten only the
last transform's branch runs; with it: a tagged main output holds every output, a DoFn that
emits from `finish_bundle` and an unsharded WriteToText give empty files, a side input's
producer is evaluated again per reader, and sinks leave `beam-temp-*` folders behind.
"""

import glob
import os
import pathlib
import tempfile
import uuid

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from components.beam_runners import pipeline_options, run_pipeline

SINKS = ("even_count", "finish_bundle", "unsharded", "side_input", "last")


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


def run(directory: str, runner: str, beam_args: list[str], final_flatten: bool) -> None:
    marks = os.path.join(directory, "marks")
    os.makedirs(marks)
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
