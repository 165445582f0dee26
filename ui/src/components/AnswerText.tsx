import { lazy, Suspense } from "react";

// The Markdown renderer (react-markdown, remark-gfm, rehype-sanitize: ~55 kB gzipped) is its own
// chunk: the chat preloads it when it opens, and until it is there an answer shows as plain text.
const load = () => import("./Markdown");
const LazyAnswer = lazy(() => load().then((module) => ({ default: module.AnswerMarkdown })));

export function preloadMarkdown(): void {
  void load().catch(() => {}); // a failed preload is retried by the lazy component, which shows the error
}

/** An answer of the model as sanitised Markdown (see Markdown.tsx), `streaming` while it grows. */
export function AnswerText({ text, streaming }: { text: string; streaming: boolean }) {
  return (
    <Suspense fallback={<div className="plain-text">{text}</div>}>
      <LazyAnswer text={text} streaming={streaming} />
    </Suspense>
  );
}
