"""The API reference page, rendered on the server from the OpenAPI schema: no scripts, nothing from a CDN."""

from __future__ import annotations

from html import escape


def _schema_name(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_name(part) for part in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}))}"
    return str(schema.get("type", "object"))


def _parameters(operation: dict) -> str:
    rows = [
        f"<tr><td><code>{escape(parameter['name'])}</code></td><td>{escape(parameter['in'])}</td>"
        f"<td>{escape(_schema_name(parameter.get('schema', {})))}</td><td>{'yes' if parameter.get('required') else 'no'}</td>"
        f"<td>{escape(parameter.get('description') or parameter.get('schema', {}).get('description', ''))}</td></tr>"
        for parameter in operation.get("parameters", [])
    ]
    if not rows:
        return ""
    return "<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th><th>description</th></tr>" + "".join(rows) + "</table>"


def _body(operation: dict) -> str:
    content = operation.get("requestBody", {}).get("content", {})
    return "".join(
        f"<p>Request body <code>{escape(media)}</code>: <code>{escape(_schema_name(body.get('schema', {})))}</code></p>"
        for media, body in content.items()
    )


def _responses(operation: dict) -> str:
    items = []
    for status, response in operation.get("responses", {}).items():
        media = ", ".join(
            f"{escape(kind)} {escape(_schema_name(body.get('schema', {})))}" if body.get("schema") else escape(kind)
            for kind, body in response.get("content", {}).items()
        )
        items.append(f"<li><b>{escape(status)}</b> {escape(response.get('description', ''))} {media}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _schemas(components: dict) -> str:
    parts = []
    for name, schema in sorted(components.get("schemas", {}).items()):
        rows = []
        required = set(schema.get("required", []))
        for field, details in schema.get("properties", {}).items():
            rows.append(
                f"<tr><td><code>{escape(field)}</code></td><td>{escape(_schema_name(details))}</td>"
                f"<td>{'yes' if field in required else 'no'}</td><td>{escape(details.get('description', ''))}</td></tr>"
            )
        table = "<table><tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>" + "".join(rows) + "</table>" if rows else ""
        parts.append(f"<h3 id='schema-{escape(name)}'>{escape(name)}</h3><p>{escape(schema.get('description', ''))}</p>{table}")
    return "".join(parts)


def render_api_reference(openapi: dict) -> str:
    """A self-contained HTML page describing every endpoint and schema of `openapi`."""
    info = openapi.get("info", {})
    sections = []
    for path, methods in openapi.get("paths", {}).items():
        for method, operation in methods.items():
            sections.append(
                f"<section><h2><code>{escape(method.upper())} {escape(path)}</code></h2>"
                f"<p><b>{escape(operation.get('summary', ''))}</b></p><p>{escape(operation.get('description', ''))}</p>"
                f"{_parameters(operation)}{_body(operation)}<p>Responses:</p>{_responses(operation)}</section>"
            )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>skin-fl web API</title>"
        "<link rel='stylesheet' href='/static/style.css'></head><body class='reference'>"
        f"<h1>{escape(info.get('title', 'API'))} (version {escape(str(info.get('version', '')))})</h1>"
        f"<p>{escape(info.get('description', ''))}</p>"
        "<p>Machine-readable schema: <a href='/openapi.json'>/openapi.json</a>. Pages: <a href='/'>classify</a>, <a href='/cases'>cases</a>.</p>"
        + "".join(sections)
        + "<h2>Schemas</h2>"
        + _schemas(openapi.get("components", {}))
        + "</body></html>"
    )
