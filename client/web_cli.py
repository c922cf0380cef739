"""`skin-fl-web`: run the clinician web app at a site, and manage who may use it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import SkinFLError
from shared.version import add_version_option


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (kebab-case keys; paths relative to the file)")
    parser.add_argument("--data-dir", type=Path, help="the web app's folder at the site: images, case database, users file")
    parser.add_argument("--users-file", type=Path, help="users file (default <data-dir>/users.json)")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-web."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-web",
        description="The clinician web app of a site: classify lesion images with the site's federated model, "
        "see Grad-CAM explanations, confirm or correct labels. Everything stays on this machine.",
    )
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="start the web app")
    _settings_arguments(serve)
    serve.add_argument("--model", type=Path, action="append", help="saved model file (final_model.pt); repeat for an ensemble")
    serve.add_argument("--db", type=Path, dest="db_path", help="case database (default <data-dir>/cases.sqlite)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; another address needs --tls-certfile/--tls-keyfile)")
    serve.add_argument("--port", type=int, help="TCP port (default 8765)")
    serve.add_argument("--tls-certfile", type=Path, help="PEM certificate for HTTPS")
    serve.add_argument("--tls-keyfile", type=Path, help="PEM private key for HTTPS")
    serve.add_argument("--threads", type=int, help="CPU threads for inference (default: torch's choice)")
    serve.add_argument("--device", help="cpu (default), cuda, cuda:N or auto")
    add_user = commands.add_parser("add-user", help="create a user and print their access token (shown once)")
    _settings_arguments(add_user)
    add_user.add_argument("name", help="user name recorded with every case (e.g. a staff id)")
    add_user.add_argument("--replace", action="store_true", help="issue a new token for an existing user (the old one stops working)")
    remove_user = commands.add_parser("remove-user", help="withdraw a user's access")
    _settings_arguments(remove_user)
    remove_user.add_argument("name")
    list_users = commands.add_parser("list-users", help="list the user names")
    _settings_arguments(list_users)
    return parser


def _settings(args: argparse.Namespace):
    from client.web.settings import load_web_settings

    overrides = {
        key: getattr(args, key, None)
        for key in ("data_dir", "users_file", "db_path", "host", "port", "tls_certfile", "tls_keyfile", "threads", "device")
    }
    overrides["models"] = getattr(args, "model", None)
    return load_web_settings(args.config, **overrides)


def serve(args: argparse.Namespace) -> int:
    """Start uvicorn with the web app."""
    from shared.extras import require_extra

    require_extra("web", "skin-fl-web serve")
    import uvicorn

    from client.web.app import create_app
    from client.web.users import UserList
    from shared.device import configure_cpu_threads

    settings = _settings(args)
    if not settings.models:
        raise SkinFLError("no model to serve: pass --model PATH (a run's final_model.pt; repeat for an ensemble) or set models in --config")
    if not UserList(settings.users_path).users:
        raise SkinFLError(
            f"no users in {settings.users_path}, so nobody could sign in; add one with "
            f"skin-fl-web add-user NAME --data-dir {settings.data_dir}"
        )
    configure_cpu_threads(settings.threads)
    app = create_app(settings)
    scheme = "https" if settings.tls_certfile else "http"
    print(f"skin-fl-web: serving {app.state.classifier.version} at {scheme}://{settings.host}:{settings.port}/ (data in {settings.data_dir})")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        log_level="info",
        server_header=False,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of skin-fl-web."""
    import shared  # noqa: F401 - installs the torchvision shim before timm is imported

    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        from client.web.users import UserList

        users = UserList(_settings(args).users_path)
        if args.command == "add-user":
            token = users.add(args.name, replace=args.replace)
            print(f"User {args.name} added to {users.path}. Their access token (shown only now; give it to them privately):")
            print(token)
        elif args.command == "remove-user":
            users.remove(args.name)
            print(f"User {args.name} removed from {users.path}; their token no longer works.")
        else:
            for name in users.names():
                print(name)
    except SkinFLError as error:
        print(f"skin-fl-web: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
