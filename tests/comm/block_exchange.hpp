// Shared by the alltoallv_blocks tests (host MPI, device-mode MPI, NCCL): a random block-wise exchange that every rank
// can reconstruct for every other rank, its send data and the receive buffer it must produce.
//
// Between each sender q and receiver p, the non-empty blocks are a list of row counts drawn from (seed, q, p); both
// sides derive it. Each side then lists its blocks in its own random interleaving of peers (keeping each peer's order,
// which is what matches), puts them at shuffled places in its buffer with gaps, and adds empty blocks with random
// peers and offsets (even past the buffer's end: an empty block must never be touched).
#pragma once

#include <kmoe/comm/communicator.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::test {

struct BlockExchange {
  std::vector<comm::RowBlock> sends, recvs;
  std::int64_t send_rows = 0, recv_rows = 0;  // buffer lengths in rows (gaps included)
  // For each row of the receive buffer: the sender and the sender's buffer row it comes from; sender -1 for a gap.
  std::vector<int> from_rank;
  std::vector<std::int64_t> from_row;
};

/// Row counts of the non-empty blocks that q sends to p (0 to max_blocks blocks of 1 to max_rows rows).
inline std::vector<std::int64_t> pair_blocks(unsigned seed, int q, int p, int max_blocks, int max_rows) {
  std::mt19937_64 g(seed * 1000003ull + static_cast<unsigned>(q) * 7919ull + static_cast<unsigned>(p) * 104729ull + 1);
  const int n = std::uniform_int_distribution<int>(0, max_blocks)(g);
  std::vector<std::int64_t> rows(n);
  for (auto& r : rows) r = std::uniform_int_distribution<int>(1, max_rows)(g);
  return rows;
}

namespace detail {
// One side's block list: per peer the row counts in matching order -> a list with a random interleaving, shuffled
// places in the buffer, gaps and extra empty blocks. `salt` tells the two sides of one rank apart.
inline std::vector<comm::RowBlock> lay_out(const std::vector<std::vector<std::int64_t>>& per_peer, unsigned seed,
                                           int rank, unsigned salt, std::int64_t& buffer_rows) {
  std::mt19937_64 g(seed * 31ull + static_cast<unsigned>(rank) * 131ull + salt);
  const int size = static_cast<int>(per_peer.size());
  // The list order: a random interleaving that keeps each peer's blocks in order.
  std::vector<int> peers;
  for (int p = 0; p < size; ++p) peers.insert(peers.end(), per_peer[p].size(), p);
  std::shuffle(peers.begin(), peers.end(), g);
  std::vector<std::size_t> next(size, 0);
  std::vector<comm::RowBlock> list;
  for (int p : peers) list.push_back(comm::RowBlock{p, 0, per_peer[p][next[p]++]});
  // Places in the buffer: the blocks in a random order, each after a gap of 0-2 rows.
  std::vector<std::size_t> place(list.size());
  for (std::size_t i = 0; i < place.size(); ++i) place[i] = i;
  std::shuffle(place.begin(), place.end(), g);
  std::int64_t at = 0;
  for (std::size_t i : place) {
    at += std::uniform_int_distribution<int>(0, 2)(g);
    list[i].offset = at;
    at += list[i].rows;
  }
  buffer_rows = at + std::uniform_int_distribution<int>(0, 2)(g);
  // Empty blocks anywhere in the list, for any peer, at any offset.
  const int empties = std::uniform_int_distribution<int>(0, 3)(g);
  for (int e = 0; e < empties; ++e) {
    const comm::RowBlock b{std::uniform_int_distribution<int>(0, size - 1)(g),
                           std::uniform_int_distribution<std::int64_t>(0, buffer_rows + 1000)(g), 0};
    list.insert(list.begin() + std::uniform_int_distribution<std::size_t>(0, list.size())(g), b);
  }
  return list;
}
}  // namespace detail

/// Rank `rank`'s side of exchange `seed` over `size` ranks.
inline BlockExchange make_exchange(unsigned seed, int rank, int size, int max_blocks = 4, int max_rows = 5) {
  auto sends_of = [&](int q, std::int64_t& rows) {
    std::vector<std::vector<std::int64_t>> per_peer(size);
    for (int p = 0; p < size; ++p) per_peer[p] = pair_blocks(seed, q, p, max_blocks, max_rows);
    return detail::lay_out(per_peer, seed, q, 1, rows);
  };
  BlockExchange x;
  x.sends = sends_of(rank, x.send_rows);
  std::vector<std::vector<std::int64_t>> from(size);
  for (int q = 0; q < size; ++q) from[q] = pair_blocks(seed, q, rank, max_blocks, max_rows);
  x.recvs = detail::lay_out(from, seed, rank, 2, x.recv_rows);
  // Expected sources: the n-th non-empty receive block from q is q's n-th non-empty send block to this rank.
  x.from_rank.assign(x.recv_rows, -1);
  x.from_row.assign(x.recv_rows, -1);
  for (int q = 0; q < size; ++q) {
    std::int64_t unused = 0;
    const auto qs = sends_of(q, unused);
    std::vector<const comm::RowBlock*> src;
    for (const auto& b : qs)
      if (b.peer == rank && b.rows > 0) src.push_back(&b);
    std::size_t n = 0;
    for (const auto& b : x.recvs) {
      if (b.peer != q || b.rows == 0) continue;
      for (std::int64_t r = 0; r < b.rows; ++r) {
        x.from_rank[b.offset + r] = q;
        x.from_row[b.offset + r] = src.at(n)->offset + r;
      }
      ++n;
    }
  }
  return x;
}

/// The value of column c of row `row` in rank q's send buffer; q < 0 gives the fill of untouched receive rows. Exact
/// in every type (bf16: integers below 256), and the fill is negative, real data never.
template <class T>
T from_float(float f) {
  if constexpr (std::is_same_v<T, kmoe::bf16>) return kmoe::bf16::from_float(f);
  else return static_cast<T>(f);
}

template <class T>
T block_value(int q, std::int64_t row, std::int64_t c) {
  if (q < 0) return from_float<T>(-1.0f - static_cast<float>((row + c) % 7));
  const std::uint64_t h = static_cast<std::uint64_t>(q) * 1000003ull + static_cast<std::uint64_t>(row) * 131ull +
                          static_cast<std::uint64_t>(c) * 7ull;
  if constexpr (std::is_integral_v<T>) return static_cast<T>((static_cast<std::int64_t>(q) << 40) + (row << 16) + c);
  else if constexpr (sizeof(T) == 2) return from_float<T>(static_cast<float>(h % 256));
  else return from_float<T>(static_cast<float>(h % (1u << 20)));
}

/// Rank q's send buffer: send_rows x w.
template <class T>
std::vector<T> send_data(int q, std::int64_t send_rows, std::int64_t w) {
  std::vector<T> v(static_cast<std::size_t>(send_rows * w));
  for (std::int64_t r = 0; r < send_rows; ++r)
    for (std::int64_t c = 0; c < w; ++c) v[r * w + c] = block_value<T>(q, r, c);
  return v;
}

/// The receive buffer before the exchange: the fill everywhere.
template <class T>
std::vector<T> recv_fill(std::int64_t recv_rows, std::int64_t w) {
  return send_data<T>(-1, recv_rows, w);
}

/// Counts the elements of `got` (recv_rows x w) that differ, bit for bit, from what exchange `x` must deliver.
template <class T>
std::int64_t count_wrong(const BlockExchange& x, const std::vector<T>& got, std::int64_t w) {
  std::int64_t wrong = 0;
  for (std::int64_t r = 0; r < x.recv_rows; ++r)
    for (std::int64_t c = 0; c < w; ++c) {
      const T want = x.from_rank[r] < 0 ? block_value<T>(-1, r, c) : block_value<T>(x.from_rank[r], x.from_row[r], c);
      if (std::memcmp(&want, &got[r * w + c], sizeof(T)) != 0) ++wrong;
    }
  return wrong;
}

}  // namespace kmoe::test
