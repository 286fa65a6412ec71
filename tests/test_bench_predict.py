"""benchmarks/bench_predict.py on a tiny model: the JSON lines parse and carry the figures (seconds)."""

import json

from test_benchmarks import load_script


def test_quick_prediction_benchmark_prints_one_json_line_per_measurement(capsys):
    bench = load_script("benchmarks/bench_predict.py")
    assert bench.main(["--quick", "--sizes"]) == 0  # the memory test needs child processes: checked below
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ceiling, predict, *others = records
    # bfloat16 is timed too where the CPU multiplies it in hardware (AVX512-BF16, AMX).
    assert [record["kind"] for record in records] == ["ceiling"] + ["predict"] * (1 + ceiling["bf16_in_hardware"])
    assert predict["precision"] == "float32" and [other["precision"] for other in others] == \
        ["bfloat16"] * ceiling["bf16_in_hardware"]
    assert ceiling["matmul_gflops"]["float32"] > 0 and isinstance(ceiling["bf16_in_hardware"], bool)
    for key in ("tiled_mpx_per_s", "gflops_useful", "fraction_of_ceiling", "tiled_rate_vs_whole_image",
                "speedup_vs_naive", "pipeline_mpx_per_s", "pipeline_vs_tiled", "tflop_per_mpx"):
        assert predict[key] > 0, key
    assert predict["tiled_max_diff_vs_whole_image"] < 1e-3  # the default overlap makes tiles exact
    assert "extrapolated" in predict["naive_loop"] and predict["filters"] == 4


def test_flops_count_matches_a_hand_count():
    bench = load_script("benchmarks/bench_predict.py")
    import unet

    config = unet.UNetConfig(depth=1, base_filters=2, dropout=0.0, head_filters=0)
    # enc0: 1->2, 2->2 (3x3, full res); bottleneck: 2->4, 4->4 (3x3, quarter res); upconv 4->2 (2x2);
    # dec0: 4->2, 2->2 (3x3); output 2->1 (1x1). FLOPs per pixel = 2 x multiply-adds.
    per_pixel = 2 * (9 * (1 * 2 + 2 * 2) + 9 * (2 * 4 + 4 * 4) / 4 + 4 * 4 * 2 + 9 * (4 * 2 + 2 * 2) + 2 * 1)
    assert bench.conv_flops_per_megapixel(unet.build_unet(config)) == per_pixel * 1e6


def test_quick_memory_test_reports_peak_memory_and_scaling(capsys):
    bench = load_script("benchmarks/bench_predict.py")
    assert bench.main(["--quick", "--filters", "--stack-pages", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]
    assert [record["kind"] for record in records] == ["memory"] * 3
    assert "512x512 PNG" in records[1]["input"] and "2-page TIFF stack" in records[2]["input"]
    assert all(100 < record["peak_rss_mb"] < 3000 for record in records)
    assert records[1]["time_per_mpx_vs_small"] > 0


def test_peak_memory_of_a_child_is_its_own(tmp_path):
    bench = load_script("benchmarks/bench_predict.py")
    script = tmp_path / "allocate.py"
    script.write_text("import sys\nimport numpy\na = numpy.ones(int(sys.argv[1]) * 2**20, 'u1')\n")
    seconds, peak = bench.measure_child([str(script), "300"])
    assert seconds > 0 and 300 < peak < 400  # this test process is far larger: not counted
    assert bench.measure_child([str(script), "1"])[1] < 100


def test_large_slice_scaling_alone_skips_the_memory_runs(capsys):
    bench = load_script("benchmarks/bench_predict.py")
    assert bench.main(["--quick", "--filters", "--no-memory-runs", "--large-repeats", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]
    assert len(records) == 1 and "512x512 PNG" in records[0]["input"]
    assert records[0]["timed_repetitions"] == {"large": 2, "small": 3} and records[0]["tile_size"] == 256
    assert records[0]["computed_px_per_image_px"] > 1  # the quick run still cuts the large slice into tiles
    assert "peak_rss_mb" not in records[0] and records[0]["time_per_mpx_vs_small"] > 0
    assert records[0]["precision"] in ("float32", "bfloat16")
    assert bench.main(["--quick", "--filters", "--no-memory-runs", "--memory-precision", "float32"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[1])["precision"] == "float32"
    assert set(records[0]["inner_tile_s"]) == {"whole_network", "decoder_cropped", "kept_px"}
