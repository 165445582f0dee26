import { memo, useDeferredValue, useEffect, useRef, useState, type ComponentProps, type JSX } from "react";
import ReactMarkdown, { type Components, type ExtraProps } from "react-markdown";
import rehypeSanitize, { defaultSchema, type Options as SanitizeSchema } from "rehype-sanitize";
import remarkGfm from "remark-gfm";
import { splitBlocks } from "../chat/markdownBlocks";

/**
 * Model output is untrusted. Raw HTML in it is never parsed as HTML: it shows as the text it is
 * (rehypeRawAsText, before sanitizing), rehype-sanitize keeps only GitHub's allow-list of elements and attributes, and every URL
 * passes `safeUrl`: only http(s), mailto and in-page fragments (GFM footnotes) survive.
 * Images are not loaded at all (a model could leak data through an image URL): their alt text shows.
 */
const ALLOWED_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

export function safeUrl(url: string): string | undefined {
  const value = url.trim();
  if (/^#[\w-]*$/.test(value)) return value;
  try {
    const parsed = new URL(value); // relative URLs throw: they are dropped too
    return ALLOWED_PROTOCOLS.has(parsed.protocol) ? parsed.href : undefined;
  } catch {
    return undefined;
  }
}

interface HastNode {
  type: string;
  value?: string;
  children?: HastNode[];
}

/** Raw HTML nodes become plain text, so "<details>" in an answer reads as written (and never runs). */
function rehypeRawAsText() {
  const walk = (node: HastNode) => {
    node.children?.forEach((child, index, siblings) => {
      if (child.type === "raw") siblings[index] = { type: "text", value: child.value ?? "" };
      else walk(child);
    });
  };
  return (tree: HastNode) => walk(tree);
}

const schema: SanitizeSchema = {
  ...defaultSchema,
  tagNames: (defaultSchema.tagNames ?? []).filter((tag) => tag !== "img"),
  protocols: { ...defaultSchema.protocols, href: ["http", "https", "mailto"], src: [], cite: ["http", "https"] },
};

type Props<Tag extends keyof JSX.IntrinsicElements> = ComponentProps<Tag> & ExtraProps;

function CodeBlock({ children }: Props<"pre">) {
  const pre = useRef<HTMLPreElement | null>(null);
  const [state, setState] = useState<"idle" | "copied" | "failed">("idle");
  useEffect(() => {
    if (state === "idle") return;
    const timer = window.setTimeout(() => setState("idle"), 2000);
    return () => window.clearTimeout(timer);
  }, [state]);
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(pre.current?.textContent ?? "");
      setState("copied");
    } catch {
      setState("failed"); // no clipboard (insecure context) or the user refused
    }
  };
  return (
    <div className="code-block">
      <button type="button" className="copy" onClick={() => void copy()}>
        {state === "copied" ? "Copied" : state === "failed" ? "Copy failed" : "Copy"}
      </button>
      <span className="sr-only" role="status">
        {state === "copied" ? "Code copied to the clipboard" : state === "failed" ? "Could not copy the code" : ""}
      </span>
      <pre ref={pre} tabIndex={0}>
        {children}
      </pre>
    </div>
  );
}

function Link({ href, title, children }: Props<"a">) {
  if (!href) return <span>{children}</span>;
  if (href.startsWith("#")) return <a href={href}>{children}</a>;
  return (
    <a href={href} title={title} target="_blank" rel="noopener noreferrer">
      {children}
    </a>
  );
}

const components: Components = {
  pre: CodeBlock,
  a: Link,
  img: ({ alt }) => (alt ? <span className="muted">[image: {alt}]</span> : null),
  table: ({ children }) => (
    <div className="table-scroll">
      <table>{children}</table>
    </div>
  ),
  // The answer sits under the page's own headings: the model's start two levels lower.
  h1: ({ children }) => <h3>{children}</h3>,
  h2: ({ children }) => <h4>{children}</h4>,
  h3: ({ children }) => <h5>{children}</h5>,
  h4: ({ children }) => <h6>{children}</h6>,
  h5: ({ children }) => <h6>{children}</h6>,
  h6: ({ children }) => <h6>{children}</h6>,
};

const remarkPlugins = [remarkGfm];
const rehypePlugins: ComponentProps<typeof ReactMarkdown>["rehypePlugins"] = [rehypeRawAsText, [rehypeSanitize, schema]];

/** Markdown rendered safely, in one pass. */
export const Markdown = memo(function Markdown({ text }: { text: string }) {
  return (
    <ReactMarkdown
      remarkPlugins={remarkPlugins}
      rehypePlugins={rehypePlugins}
      components={components}
      urlTransform={safeUrl}
    >
      {text}
    </ReactMarkdown>
  );
});

/**
 * An answer that may still be streaming. While it streams, the text is split into blocks and only
 * the last, growing block is parsed again per delta (the finished ones are memoized by their text);
 * React may also skip intermediate texts under load (useDeferredValue). Once the answer is complete
 * it is rendered in one pass, so constructs spanning blocks come out right.
 */
export function AnswerMarkdown({ text, streaming }: { text: string; streaming: boolean }) {
  const shown = useDeferredValue(text);
  if (!streaming) return <Markdown text={text} />;
  return (
    <>
      {splitBlocks(shown).map((block, index) => (
        <Markdown key={index} text={block} />
      ))}
    </>
  );
}
