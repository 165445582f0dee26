import { useEffect, useState, type FormEvent } from "react";
import type { JsonObject } from "@bufbuild/protobuf";
import {
  VariableType,
  type PreviewEmailResponse,
  type Template,
} from "@gen/opsmesh/notify/v1/notify_pb.js";
import type { Api } from "../api/transport";

/** Sample values for a template's variables, by their declared types. */
export function sampleData(template: Template | undefined): JsonObject {
  const data: JsonObject = {};
  for (const variable of template?.variables ?? []) {
    switch (variable.type) {
      case VariableType.NUMBER:
        data[variable.name] = 3;
        break;
      case VariableType.BOOLEAN:
        data[variable.name] = true;
        break;
      case VariableType.URL:
        data[variable.name] = "https://example.com/";
        break;
      case VariableType.TIMESTAMP:
        data[variable.name] = new Date(0).toISOString();
        break;
      case VariableType.EMAIL:
        data[variable.name] = "someone@example.com";
        break;
      case VariableType.LIST:
        data[variable.name] = [`${variable.name} 1`, `${variable.name} 2`];
        break;
      default:
        data[variable.name] = `Sample ${variable.name.replace(/_/g, " ")}`;
    }
  }
  return data;
}

/** Admins render any template with sample data before it goes out. */
export function EmailPreview({ api, onError }: { api: Api; onError: (error: unknown) => void }) {
  const [templates, setTemplates] = useState<Template[]>([]);
  const [template, setTemplate] = useState("");
  const [locale, setLocale] = useState("");
  const [data, setData] = useState("{}");
  const [dataError, setDataError] = useState("");
  const [preview, setPreview] = useState<PreviewEmailResponse | null>(null);

  useEffect(() => {
    api.notify
      .listTemplates({})
      .then((reply) => {
        setTemplates(reply.templates);
        setTemplate((current) => current || reply.templates[0]?.id || "");
      })
      .catch(onError);
  }, [api, onError]);

  const chosen = templates.find((t) => t.id === template);

  useEffect(() => {
    setData(JSON.stringify(sampleData(chosen), null, 2));
    setPreview(null);
  }, [chosen]);

  const render = async (event: FormEvent) => {
    event.preventDefault();
    let parsed: JsonObject;
    try {
      const value: unknown = JSON.parse(data || "{}");
      if (typeof value !== "object" || value === null || Array.isArray(value)) throw new Error("not an object");
      parsed = value as JsonObject;
      setDataError("");
    } catch {
      setDataError("The data must be a JSON object.");
      return;
    }
    try {
      setPreview(await api.notify.previewEmail({ template, locale, data: parsed }));
    } catch (error) {
      onError(error);
    }
  };

  return (
    <section className="email" aria-label="Email preview">
      <h1>Email preview</h1>
      <form className="stack" onSubmit={(e) => void render(e)}>
        <label>
          Template
          <select value={template} onChange={(e) => setTemplate(e.target.value)}>
            {templates.map((t) => (
              <option key={t.id} value={t.id}>
                {t.id}
              </option>
            ))}
          </select>
        </label>
        {chosen ? <p className="muted">{chosen.description}</p> : null}
        <label>
          Locale
          <select value={locale} onChange={(e) => setLocale(e.target.value)}>
            <option value="">default</option>
            {chosen?.locales.map((l) => (
              <option key={l} value={l}>
                {l}
              </option>
            ))}
          </select>
        </label>
        {chosen?.variables.length ? (
          <p className="muted">
            Variables: {chosen.variables.map((v) => `${v.name}${v.required ? "*" : ""}`).join(", ")}
          </p>
        ) : null}
        <label>
          Data (JSON)
          <textarea rows={6} value={data} onChange={(e) => setData(e.target.value)} aria-invalid={dataError !== ""} />
        </label>
        {dataError ? <p className="error-text" role="alert">{dataError}</p> : null}
        <button type="submit" className="primary" disabled={!template}>
          Render
        </button>
      </form>
      {preview ? (
        <div className="preview">
          <h2>{preview.subject}</h2>
          {/* Sandboxed: the email's HTML runs no script and cannot reach this page. */}
          <iframe title="HTML body" sandbox="" srcDoc={preview.htmlBody} />
          <pre className="text-body">{preview.textBody}</pre>
        </div>
      ) : null}
    </section>
  );
}
