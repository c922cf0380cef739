"""The site's own ClientApp runner: skin-fl's code is loaded once, and each Flower task runs in a worker forked from it.

Flower's default runner starts a fresh `flwr-clientapp` process for every message, which imports
torch, timm and the site code again (seconds each time) and runs whatever app package the
coordinator sent. `skin-fl-client` instead starts the SuperNode with `--isolation process` under
this runner, which loads the installed code once and, for each task the SuperNode hands out,
forks a worker that checks the coordinator's app package against that code
(`client.app_package`), runs the installed ClientApp and pushes its reply.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

WARM_MODULES = (
    "client.app", "client.privacy_round", "client.gan_rounds", "client.report", "client.app_package",
    "flwr.supernode.runtime.run_clientapp", "flwr.supercore.heartbeat",
)
"""Loaded before the first task, so no worker imports them: the plain rounds, DP rounds, GAN rounds, the final
report, and Flower's task protocol."""

POLL_INTERVAL_S = 0.2
"""Pause between the runner's questions to the SuperNode for a new task (Flower's own SuperExec waits 1 s)."""

STOP_WAIT_S = 15.0

logger = logging.getLogger(__name__)


def runner_command(supernode_command: Sequence[str], runtime_port: int) -> list[str]:
    """The command that runs `supernode_command` (a flower-supernode line with `--port runtime_port`) under this runner."""
    return [sys.executable, "-m", "client.task_runner", "--runtime-port", str(runtime_port), "--",
            *supernode_command, "--isolation", "process"]


def load_site_code() -> float:
    """Import the site's code once (the workers inherit it); returns the seconds it took."""
    started = time.perf_counter()
    for name in WARM_MODULES:
        importlib.import_module(name)
    from client.app_package import install_root, installed_code

    installed_code(install_root())
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while loading the site code; forked workers could not use the GPU")
    return time.perf_counter() - started


def run_task(runtime_address: str, token: str) -> int:
    """One task in a worker: pull the message, check the app package, run the installed ClientApp, push the reply."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from client.app import app
    from client.app_package import check_app_package
    from client.reply_guard import error_reply

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "the task failed before its message was read; see the site's log"
    started = time.perf_counter()
    seconds = {}
    try:
        message, context, _run, fab = pull_task_input(client)
        seconds["reading the task"] = time.perf_counter() - started
        check_app_package(fab.content)
        handled = time.perf_counter()
        reply = app(message=message, context=context)
        seconds["the ClientApp"] = time.perf_counter() - handled
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - the worker reports every failure as a fixed code
        if message is None:
            logger.error("the task could not be read from the SuperNode: %s", error, exc_info=error)
        else:
            reply = error_reply(message, error)
            details = reply.error.reason
    finally:
        try:
            if reply is not None and context is not None:
                sending = time.perf_counter()
                push_message(client, reply, context)
                seconds["sending the reply"] = time.perf_counter() - sending
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
    kind = message.metadata.message_type if message is not None else "a task"
    parts = ", ".join(f"{part} {value:.1f} s" for part, value in seconds.items())
    print(f"{time.strftime('%H:%M:%S')} skin-fl site runner: {kind} handled in {time.perf_counter() - started:.1f} s ({parts})",
          flush=True)
    return 0 if status == SubStatus.COMPLETED else 1


class TaskRunner:
    """Runs the SuperNode as a child, asks its runtime API for tasks and forks one worker per task."""

    def __init__(self, supernode_command: Sequence[str], runtime_port: int):
        self.supernode_command = list(supernode_command)
        self.runtime_address = f"127.0.0.1:{runtime_port}"
        self.supernode: subprocess.Popen | None = None
        self.workers: set[int] = set()
        self.stopping = False

    def start_supernode(self) -> None:
        """Start the SuperNode (it shares this process's output and process group)."""
        self.supernode = subprocess.Popen(self.supernode_command, stdin=subprocess.DEVNULL)

    def request_stop(self, *_ignored) -> None:
        """Stop the SuperNode and the workers; serve() returns once the SuperNode has exited."""
        self.stopping = True
        _signal([*self.workers, *([self.supernode.pid] if self.supernode else [])], signal.SIGTERM)

    def _reap_workers(self) -> None:
        for pid in list(self.workers):
            try:
                finished, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                finished = pid
            if finished:
                self.workers.discard(pid)

    def _fork_worker(self, token: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = run_task(self.runtime_address, token)
            except BaseException as error:  # noqa: BLE001 - a worker never returns into the runner's loop
                logger.error("task worker failed: %s", error, exc_info=error)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.workers.add(pid)

    def serve(self) -> int:
        """Hand each task to a worker until the SuperNode exits; returns the SuperNode's exit code."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        assert self.supernode is not None, "start_supernode() first"
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        )
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while True:
                self._reap_workers()
                code = self.supernode.poll()
                if code is not None:
                    return code
                if self.stopping:
                    time.sleep(POLL_INTERVAL_S)
                    continue
                try:
                    response = client.AcquireTask(request)
                except httpx.HTTPError:  # the SuperNode's runtime API is not up yet, or is going down
                    time.sleep(POLL_INTERVAL_S)
                    continue
                if response.HasField("task") and response.token:
                    self._fork_worker(response.token)
                    continue
                time.sleep(POLL_INTERVAL_S)
        finally:
            client.close()
            self._stop_workers()

    def _stop_workers(self) -> None:
        deadline = time.monotonic() + STOP_WAIT_S
        while self.workers and time.monotonic() < deadline:
            self._reap_workers()
            time.sleep(0.1)
        _signal(self.workers, signal.SIGKILL)


def _signal(pids, number: int) -> None:
    """Send signal `number` to each process that still exists."""
    for pid in list(pids):
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m client.task_runner --runtime-port PORT -- flower-supernode ... --isolation process`."""
    parser = argparse.ArgumentParser(prog="python -m client.task_runner", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-port", type=int, required=True, help="the SuperNode's runtime API port (its --port)")
    parser.add_argument("supernode_command", nargs=argparse.REMAINDER, help="-- then the flower-supernode command line")
    args = parser.parse_args(argv)
    command = args.supernode_command[1:] if args.supernode_command[:1] == ["--"] else args.supernode_command
    if not command or "--isolation" not in command:
        parser.error("give the flower-supernode command after '--', with '--isolation process'")
    from shared.protocol import FLOWER_OBJECT_TRANSFER_ENV

    # Before Flower is imported here (it reads them once) and before the SuperNode starts.
    os.environ.update(FLOWER_OBJECT_TRANSFER_ENV)
    runner = TaskRunner(command, args.runtime_port)
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, runner.request_stop)
    runner.start_supernode()
    try:
        seconds = load_site_code()
    except Exception as error:  # noqa: BLE001 - without its code the site cannot answer: stop the SuperNode too
        print(f"skin-fl site runner: error: the site's code could not be loaded ({type(error).__name__}: {error}); "
              "reinstall skin-fl at this site (pip install skin-fl) and start skin-fl-client again.", file=sys.stderr, flush=True)
        runner.request_stop()
        runner.supernode.wait()
        return 1
    print(f"skin-fl site runner: the site's code is loaded ({seconds:.1f} s); each task runs in a worker forked from it.",
          flush=True)
    return runner.serve()


if __name__ == "__main__":
    sys.exit(main())
