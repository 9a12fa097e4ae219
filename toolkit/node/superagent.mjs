// ES module entry of the superagent toolkit: the same functions as superagent.js.
import toolkit from "./superagent.js";

export const {
  HEADER,
  MAX_LINE,
  currentRequestId,
  emit,
  encode,
  middleware,
  newRequestId,
  wellFormed,
  withRequestId,
  wrap,
} = toolkit;
export default toolkit;
