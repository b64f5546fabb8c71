"""The `pagoda` command.

Its subcommands' modules are imported as the parser is built, not with this module: the processes
the server starts (multiprocessing's children) run the main module again, and so import this one."""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> None:
    from pagoda import LLM, SamplingParams

    llm = LLM(model=args.model, max_model_len=args.max_model_len, device=args.device, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    messages = [{"role": "user", "content": args.prompt}]
    output = llm.chat(messages, params, use_tqdm=False)[0]
    print(output.outputs[0].text)


def _serve(args: argparse.Namespace) -> None:
    from pagoda.config import EngineConfig
    from pagoda.engine.resolve_apart import resolve_ahead
    from pagoda.entrypoints.openai.cli_args import server_engine_kwargs
    from pagoda.entrypoints.openai.startup import bind_listener, bind_unix_listener

    # Bound before the server's imports and the engine's load: a port in use fails at once.
    listener = bind_unix_listener(args.uds) if args.uds else bind_listener(args.host or "0.0.0.0", args.port)
    engine_config = EngineConfig(**server_engine_kwargs(args))
    resolve_ahead(engine_config)  # in the process main prepared, while this one imports the web stack
    from pagoda.entrypoints.openai.server import run_server  # FastAPI only loads for the server

    run_server(args, listener, engine_config)


def _run_batch(args: argparse.Namespace) -> None:
    from pagoda.entrypoints.openai import run_batch  # FastAPI only loads for the server's handlers

    run_batch.main(args)


def build_parser() -> argparse.ArgumentParser:
    from pagoda.benchmarks import latency, throughput
    from pagoda.benchmarks import serve as serve_bench
    from pagoda.entrypoints.config_file import add_config_argument
    from pagoda.entrypoints.engine_args import add_engine_argument
    from pagoda.entrypoints.openai import chat_cli, cli_args

    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM inference engine")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="how much to log (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="answer one chat message with a model (default: the embedded one)")
    gen.add_argument("prompt", help="the user message")
    for knob in ("model", "max_model_len", "device", "seed"):
        add_engine_argument(gen, knob)
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    gen.set_defaults(func=_generate)

    serve = commands.add_parser("serve", help="serve a model over the OpenAI API (default: the embedded one)")
    cli_args.add_arguments(serve)
    add_config_argument(serve)
    serve.set_defaults(func=_serve)

    batch = commands.add_parser("run-batch", help="run a file of OpenAI batch requests (chat and completions) "
                                "offline, as vLLM's run_batch")
    cli_args.add_run_batch_arguments(batch)
    add_config_argument(batch)
    batch.set_defaults(func=_run_batch)

    chat = commands.add_parser("chat", help="chat with a running `pagoda serve` from the terminal")
    chat_cli.add_arguments(chat)
    chat.set_defaults(func=chat_cli.main)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    tput = bench_kinds.add_parser("throughput", help="offline throughput on random requests")
    throughput.add_arguments(tput)
    tput.set_defaults(func=throughput.main)
    lat = bench_kinds.add_parser("latency", help="end-to-end latency of one batch and decode ms per output token")
    latency.add_arguments(lat)
    lat.set_defaults(func=latency.main)
    online = bench_kinds.add_parser("serve", help="online serving benchmark against a running server")
    serve_bench.add_arguments(online)
    online.set_defaults(func=serve_bench.main)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand argv names: its first word that is neither an option nor --log-level's value."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> None:
    from pagoda.entrypoints.config_file import expand_config_files
    from pagoda.logger import log_to_stderr

    argv = sys.argv[1:] if argv is None else argv
    if _command(argv) == "serve":
        from pagoda.engine.core_launcher import start_core_server
        from pagoda.engine.resolve_apart import prepare_resolver

        # Before the parser, whose imports take seconds (transformers' among them): the core
        # server's imports, then those of the process that resolves the configuration, run beside them.
        start_core_server()
        prepare_resolver()
    parser = build_parser()
    args = parser.parse_args(expand_config_files(parser, argv))
    log_to_stderr(args.log_level.upper())
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
