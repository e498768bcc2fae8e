"""Client subcommands of `pecsched`: submit, status, cancel, list, top.

Every command takes `--target ADDR` (default 127.0.0.1:50051), `--api-key KEY`, `--json` (machine-
readable output on stdout), `--timeout-s`, and `--tls` / `--root-certs PEM` for TLS. The CLI reads
no environment variables (only config modules do); to keep a key out of the shell history, pass
it as `--api-key "$PECSCHED_API_KEY"`. Exit codes: 0 success, 1 the server refused the call or the
request did not finish, 2 bad command-line input. Only argparse is imported at module load; grpc
comes in with the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdk.client import Client
    from sdk.types import Prompt

DEFAULT_TARGET = "127.0.0.1:50051"
_STATES = (
    "queued",
    "prefilling",
    "paused",
    "transferring_kv",
    "decoding",
    "finished",
    "cancelled",
    "failed",
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client subcommands to the `pecsched` parser."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--target", default=DEFAULT_TARGET, help="control plane host:port")
    group.add_argument(
        "--api-key", help='API key (not read from the environment; use --api-key "$VAR")'
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    group.add_argument("--root-certs", metavar="PEM", help="PEM file of roots to verify TLS with")
    group.add_argument("--timeout-s", type=float, help="deadline of each command's calls")
    group.add_argument("--json", action="store_true", help="machine-readable output")
    _register_submit(subparsers, common)
    _register_status(subparsers, common)
    _register_cancel(subparsers, common)
    _register_list(subparsers, common)
    _register_top(subparsers, common)


def _register_submit(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "submit",
        parents=[common],
        help="submit a request and print its output",
        description="Submit a prompt (text or --token-ids) and print the output and request id. "
        'With --json: {"request_id", "token_ids", "text", "state", "error"}.',
    )
    p.add_argument("text", nargs="?", help="prompt text")
    p.add_argument("--token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send TEXT as a user chat message (the model's chat template applies)",
    )
    p.add_argument("--max-tokens", type=int, required=True, help="tokens to generate at most")
    p.add_argument("--no-wait", action="store_true", help="print the request id and return")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--priority", type=int, default=0, help="higher runs earlier in its class")
    p.add_argument("--tenant", default="", help="tenant (default: the API key's)")
    p.add_argument("--deadline-s", type=float, help="give up on the request after this long")
    p.add_argument("--idempotency-key", help="reuse to make a resubmission return the same id")
    p.set_defaults(handler=_submit)


def _register_status(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("status", parents=[common], help="show one request")
    p.add_argument("request_id")
    p.set_defaults(handler=_status)


def _register_cancel(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("cancel", parents=[common], help="cancel a request")
    p.add_argument("request_id")
    p.set_defaults(handler=_cancel)


def _register_list(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("list", parents=[common], help="list requests, newest first")
    p.add_argument("--state", action="append", choices=_STATES, help="repeatable; default any")
    p.add_argument("--class", dest="request_class", choices=("short", "long"), help="length class")
    p.add_argument("--tenant", default="", help="only this tenant's requests")
    p.add_argument(
        "--limit", type=int, default=20, help="at most this many, the newest (default 20)"
    )
    p.set_defaults(handler=_list)


def _register_top(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "top", parents=[common], help="live view of queues, instances and counters"
    )
    p.add_argument("--interval-s", type=float, default=1.0, help="refresh period")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.set_defaults(handler=_top)


# -- handlers --------------------------------------------------------------------------------

# Terminal control sequences of `top` (VT100/xterm).
_ENTER_SCREEN = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
_LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"  # cursor shown, the shell's screen back
_HOME = "\x1b[H"  # cursor to the top-left corner
_CLEAR_LINE = "\x1b[K"  # erase to the end of the line
_CLEAR_BELOW = "\x1b[J"  # erase below the cursor


def _run(args: argparse.Namespace, body: Callable[[Client], int]) -> int:
    # Opens the client, runs `body`, and turns SDK and input errors into messages + exit codes.
    from sdk.client import Client
    from sdk.errors import PecSchedError

    try:
        root_certificates = None
        if args.root_certs is not None:
            with open(args.root_certs, "rb") as pem:
                root_certificates = pem.read()
        with Client(
            args.target,
            api_key=args.api_key,
            tls=args.tls,
            root_certificates=root_certificates,
            timeout_s=args.timeout_s if args.timeout_s is not None else 30.0,
        ) as client:
            return body(client)
    except PecSchedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _print_json(value: Any) -> None:
    from sdk.render import to_jsonable

    print(json.dumps(to_jsonable(value), indent=None, sort_keys=False))


def _parse_token_ids(raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--token-ids must be comma-separated integers, got {raw!r}") from None


def _submit(args: argparse.Namespace) -> int:
    from datetime import datetime, timedelta

    from sdk.types import Sampling

    def body(client: Client) -> int:
        prompt = _prompt_of(args)
        deadline = None
        if args.deadline_s is not None:
            deadline = datetime.now(UTC) + timedelta(seconds=args.deadline_s)
        ack = client.submit(
            prompt,
            max_new_tokens=args.max_tokens,
            sampling=Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
            priority=args.priority,
            tenant=args.tenant,
            deadline=deadline,
            idempotency_key=args.idempotency_key,
        )
        if args.no_wait:
            if args.json:
                _print_json(ack)
            else:
                print(ack.request_id)
            return 0
        if args.json:
            return _print_result_json(client, ack.request_id)
        return _stream_text(client, ack.request_id)

    return _run(args, body)


def _prompt_of(args: argparse.Namespace) -> Prompt:
    """The prompt `submit` was given: TEXT (as one user message with --chat) or --token-ids."""
    from sdk.types import ChatMessage

    if (args.text is None) == (args.token_ids is None):
        raise ValueError("give the prompt either as TEXT or as --token-ids, not both")
    if args.chat and args.text is None:
        raise ValueError("--chat needs the prompt as TEXT")
    if args.text is None:
        return _parse_token_ids(args.token_ids)
    return [ChatMessage("user", args.text)] if args.chat else args.text


def _print_result_json(client: Client, request_id: str) -> int:
    """Wait for the request's result and print it as JSON; 0 when it finished."""
    from sdk.types import RequestState

    result = client.result(request_id)
    _print_json(
        {
            "request_id": result.request_id,
            "token_ids": list(result.token_ids),
            "text": result.text,
            "state": result.state.value,
            "error": result.error,
        }
    )
    return 0 if result.state is RequestState.FINISHED else 1


def _stream_text(client: Client, request_id: str) -> int:
    """Human output: stream the text as it arrives, then a summary line; 0 when it finished."""
    from sdk.types import RequestState

    num_tokens, final = 0, RequestState.UNSPECIFIED
    error = ""
    for chunk in client.generate(request_id):
        num_tokens += len(chunk.token_ids)
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.final_state is not None:
            final, error = chunk.final_state, chunk.error
    print()
    suffix = f": {error}" if error else ""
    print(f"request {request_id} {final.value}, {num_tokens} tokens{suffix}")
    return 0 if final is RequestState.FINISHED else 1


def _status(args: argparse.Namespace) -> int:
    from sdk.render import format_request

    def body(client: Client) -> int:
        info = client.get(args.request_id)
        if args.json:
            _print_json(info)
        else:
            print(format_request(info))
        return 0

    return _run(args, body)


def _cancel(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        info = client.cancel(args.request_id)
        if args.json:
            _print_json(info)
        else:
            print(f"request {info.request_id} {info.state.value}")
        return 0

    return _run(args, body)


def _list(args: argparse.Namespace) -> int:
    from sdk.render import format_request_table
    from sdk.types import RequestClass, RequestState

    def body(client: Client) -> int:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        infos = list(
            client.list_requests(
                states=[RequestState(s) for s in args.state or ()],
                request_class=None
                if args.request_class is None
                else RequestClass(args.request_class),
                tenant=args.tenant,
                page_size=min(args.limit, 1000),
                limit=args.limit,
            )
        )
        if args.json:
            _print_json(infos)
        else:
            print(format_request_table(infos))
        return 0

    return _run(args, body)


def _top(args: argparse.Namespace) -> int:
    import shutil

    from sdk.render import fit_screen, format_snapshot

    # On a terminal: the alternate screen (the shell's screen comes back on exit), each
    # snapshot drawn over the last from the top-left corner, cut to the terminal's size.
    live = sys.stdout.isatty() and not (args.once or args.json)

    def body(client: Client) -> int:
        if live:
            sys.stdout.write(_ENTER_SCREEN)
        try:
            for snapshot in client.watch(interval_s=args.interval_s):
                if args.json:
                    _print_json(snapshot)
                elif live:
                    size = shutil.get_terminal_size()
                    screen = fit_screen(format_snapshot(snapshot), size.columns, size.lines)
                    sys.stdout.write(
                        _HOME
                        + screen.replace("\n", _CLEAR_LINE + "\n")
                        + _CLEAR_LINE
                        + _CLEAR_BELOW
                    )
                    sys.stdout.flush()
                else:
                    print(format_snapshot(snapshot) + ("" if args.once else "\n"), flush=True)
                if args.once:
                    return 0
        except KeyboardInterrupt:
            return 0
        finally:
            if live:
                sys.stdout.write(_LEAVE_SCREEN)
                sys.stdout.flush()
        return 0

    return _run(args, body)
